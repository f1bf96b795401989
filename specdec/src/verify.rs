//! Target side: the acceptance rules that make speculative decoding lossless.
//!
//! - Greedy: accept drafted token i while it equals `argmax` of target row i; at the first
//!   mismatch emit that argmax; if all γ match, emit the bonus `argmax` of row γ.
//! - Sampled (Leviathan et al. 2023; Chen et al. 2023): accept x_i with probability
//!   `min(1, p_i(x_i) / q_i(x_i))`; at the first rejection emit a sample of
//!   `norm(max(0, p_i − q_i))` (q is 0 outside its sparse support) and stop; if all are accepted,
//!   emit a bonus sample of p_γ. Each emitted token is then distributed exactly as p.
//!
//! Row i of the target always predicts position i of the block, so γ drafted tokens need γ + 1
//! rows; γ = 0 degenerates to plain target decoding from the single row.

use rand::Rng;

use crate::error::SpecError;
use crate::sampling::{argmax, probs_from_logits, try_sample};
use crate::types::{SamplingParams, SparseDist};

/// Outcome of verifying one draft block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// How many drafted tokens were accepted (0 ≤ accepted ≤ γ).
    pub accepted: usize,
    /// The token emitted after the accepted prefix: the correction at the first rejection, or
    /// the bonus token when every drafted token was accepted.
    pub next_token: u32,
}

impl Verdict {
    /// Tokens this round commits: the accepted prefix plus `next_token`.
    pub fn emitted(&self) -> usize {
        self.accepted + 1
    }
}

/// Greedy verification: `target_logits` has `draft.len() + 1` rows of equal, non-zero width.
pub fn verify_greedy(draft: &[u32], target_logits: &[&[f32]]) -> Result<Verdict, SpecError> {
    let vocab_size = check_rows(draft, target_logits)?;
    check_draft_ids(draft, vocab_size)?;
    for (i, (&token, row)) in draft.iter().zip(target_logits).enumerate() {
        let best = argmax(row);
        if token != best {
            return Ok(Verdict {
                accepted: i,
                next_token: best,
            });
        }
    }
    Ok(Verdict {
        accepted: draft.len(),
        next_token: argmax(target_logits[draft.len()]),
    })
}

/// Sampled verification against the exact sparse proposals `q` (one per drafted token) and the
/// dense target distributions `target_probs` (`draft.len() + 1` rows, already through the same
/// temperature/top-k/top-p transform as q).
///
/// Every q is validated and each drafted token must lie in its q's support: a token the draft
/// could not have sampled means the draft node and this verifier disagree about q, and accepting
/// anything under a wrong q would silently bias the output.
pub fn verify_sampled<R: Rng + ?Sized>(
    draft: &[u32],
    q: &[SparseDist],
    target_probs: &[&[f32]],
    rng: &mut R,
) -> Result<Verdict, SpecError> {
    let vocab_size = check_rows(draft, target_probs)?;
    check_draft_ids(draft, vocab_size)?;
    if q.len() != draft.len() {
        return Err(SpecError::ProposalCount {
            drafted: draft.len(),
            got: q.len(),
        });
    }
    for (position, (&token, q_i)) in draft.iter().zip(q).enumerate() {
        q_i.validate(vocab_size)?;
        if !q_i.contains(token) {
            return Err(SpecError::DraftNotInProposal { position, token });
        }
    }
    for (i, ((&token, q_i), p_i)) in draft.iter().zip(q).zip(target_probs).enumerate() {
        let p_x = f64::from(p_i[token as usize].max(0.0));
        let q_x = f64::from(q_i.prob(token));
        // u·q < p  ⇔  u < p/q, i.e. accept with probability min(1, p/q) without dividing; p ≥ q
        // always accepts and p = 0 always rejects. One uniform is drawn per position either way,
        // so the RNG stream does not depend on the values.
        let u: f64 = rng.random();
        if u * q_x < p_x {
            continue;
        }
        let next_token =
            sample_residual(p_i, q_i, rng).ok_or(SpecError::DegenerateTarget { row: i })?;
        return Ok(Verdict {
            accepted: i,
            next_token,
        });
    }
    let last = draft.len();
    let next_token =
        try_sample(target_probs[last], rng).ok_or(SpecError::DegenerateTarget { row: last })?;
    Ok(Verdict {
        accepted: last,
        next_token,
    })
}

/// Picks greedy or sampled verification from `params`, turning each target logit row into p with
/// [`probs_from_logits`] first. `q` is ignored for greedy parameters (the draft's argmax needs no
/// proposal to be verified).
pub fn verify<R: Rng + ?Sized>(
    params: &SamplingParams,
    draft: &[u32],
    q: &[SparseDist],
    target_logits: &[&[f32]],
    rng: &mut R,
) -> Result<Verdict, SpecError> {
    if params.is_greedy() {
        return verify_greedy(draft, target_logits);
    }
    check_rows(draft, target_logits)?;
    let probs: Vec<Vec<f32>> = target_logits
        .iter()
        .map(|row| probs_from_logits(row, params))
        .collect();
    let rows: Vec<&[f32]> = probs.iter().map(Vec::as_slice).collect();
    verify_sampled(draft, q, &rows, rng)
}

/// Samples the correction token from `norm(max(0, p − q))`.
///
/// If the residual has no mass, p ≤ q everywhere; both sum to 1, so p = q on q's support and 0
/// elsewhere, and a rejection then has probability 0 (p(x) ≥ q(x) for every x q can propose).
/// We can only get here through float rounding of a p that equals q up to a few ulps, and in that
/// limit the exact residual is undefined but the correct *output* distribution is p itself, so we
/// sample p. `None` only when p also has no mass.
fn sample_residual<R: Rng + ?Sized>(p: &[f32], q: &SparseDist, rng: &mut R) -> Option<u32> {
    let mut residual = p.to_vec();
    for (&id, &q_x) in q.ids.iter().zip(&q.probs) {
        let r = &mut residual[id as usize];
        *r = (*r - q_x).max(0.0);
    }
    try_sample(&residual, rng).or_else(|| try_sample(p, rng))
}

/// Checks `draft.len() + 1` rows of equal non-zero width and returns that width (the vocabulary).
fn check_rows(draft: &[u32], rows: &[&[f32]]) -> Result<usize, SpecError> {
    if rows.len() != draft.len() + 1 {
        return Err(SpecError::TargetRowCount {
            drafted: draft.len(),
            got: rows.len(),
        });
    }
    let vocab_size = rows[0].len();
    for (row, r) in rows.iter().enumerate() {
        if r.is_empty() || r.len() != vocab_size {
            return Err(SpecError::TargetRowWidth {
                row,
                expected: vocab_size,
                got: r.len(),
            });
        }
    }
    Ok(vocab_size)
}

fn check_draft_ids(draft: &[u32], vocab_size: usize) -> Result<(), SpecError> {
    match draft.iter().position(|&t| t as usize >= vocab_size) {
        Some(position) => Err(SpecError::DraftOutOfVocab {
            position,
            token: draft[position],
            vocab_size,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
