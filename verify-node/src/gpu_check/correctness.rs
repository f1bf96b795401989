//! Correctness on the device: logits and greedy decoding against a CPU reference, and batch
//! invariance (a position's logits alone, inside a block, inside a ragged batch).

use anyhow::{ensure, Result};
use edgespec_model::{CausalLm, SeqRequest, SessionId};
use edgespec_specdec::argmax;

use super::report::{BatchInvariance, Correctness};
use super::util::{max_abs, max_abs_diff};

const ALL: usize = usize::MAX;

fn req(session: SessionId, start: usize, tokens: &[u32], logits_for_last: usize) -> SeqRequest {
    SeqRequest {
        session,
        start,
        tokens: tokens.to_vec(),
        logits_for_last,
    }
}

/// Greedy decoding of `n` tokens after `prompt`, one token per forward.
pub fn greedy(
    model: &mut dyn CausalLm,
    session: SessionId,
    prompt: &[u32],
    n: usize,
) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(n);
    let l = model.forward_batch(&[req(session, 0, prompt, 1)])?;
    let mut next = argmax(l[0].row(0));
    while out.len() < n {
        out.push(next);
        if out.len() == n {
            break;
        }
        let start = prompt.len() + out.len() - 1;
        let l = model.forward_batch(&[req(session, start, &[next], 1)])?;
        next = argmax(l[0].row(0));
    }
    model.release(session);
    Ok(out)
}

/// Batch invariance of `model` on `seq`, whose first `p` tokens are the prompt: rows for the
/// positions `p − 1 .. seq.len()` computed (a) one token per forward, (b) as one block of
/// `seq.len() − p + 1` tokens, (c) as that block inside a ragged batch with two other sessions.
pub fn batch_invariance(
    model: &mut dyn CausalLm,
    seq: &[u32],
    p: usize,
    sid: SessionId,
) -> Result<BatchInvariance> {
    ensure!(
        p >= 2 && seq.len() > p,
        "need a prompt of 2+ tokens and a continuation"
    );
    let vocab = model.info().vocab_size;
    let (a, b, c, d1, d2) = (sid, sid + 1, sid + 2, sid + 3, sid + 4);
    // (a) alone.
    let mut alone: Vec<Vec<f32>> = Vec::new();
    let l = model.forward_batch(&[req(a, 0, &seq[..p], 1)])?;
    alone.push(l[0].row(0).to_vec());
    for j in p..seq.len() {
        let l = model.forward_batch(&[req(a, j, &seq[j..=j], 1)])?;
        alone.push(l[0].row(0).to_vec());
    }
    // (b) one block.
    model.forward_batch(&[req(b, 0, &seq[..p - 1], 1)])?;
    let block = model.forward_batch(&[req(b, p - 1, &seq[p - 1..], ALL)])?;
    // (c) the block in a ragged batch.
    let other = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7919 + salt) % vocab as u32)
            .collect()
    };
    model.forward_batch(&[
        req(d1, 0, &other(5, 11), 1),
        req(c, 0, &seq[..p - 1], 1),
        req(d2, 0, &other(9, 23), 1),
    ])?;
    let batch = model.forward_batch(&[
        req(d1, 5, &other(3, 31), ALL),
        req(c, p - 1, &seq[p - 1..], ALL),
        req(d2, 9, &other(1, 47), ALL),
    ])?;
    for s in [a, b, c, d1, d2] {
        model.release(s);
    }
    let (block, batch) = (&block[0], &batch[1]);
    ensure!(
        block.rows == alone.len() && batch.rows == alone.len(),
        "row counts differ"
    );
    let mut r = BatchInvariance {
        positions: alone.len(),
        block_len: seq.len() - p + 1,
        argmax_agree: true,
        ..BatchInvariance::default()
    };
    for (i, row) in alone.iter().enumerate() {
        let (x, y) = (block.row(i), batch.row(i));
        r.max_abs_diff_block_vs_alone = r.max_abs_diff_block_vs_alone.max(max_abs_diff(row, x));
        r.max_abs_diff_batch_vs_alone = r.max_abs_diff_batch_vs_alone.max(max_abs_diff(row, y));
        let m = argmax(row);
        r.argmax_agree &= argmax(x) == m && argmax(y) == m;
    }
    r.exact = r.max_abs_diff_block_vs_alone == 0.0 && r.max_abs_diff_batch_vs_alone == 0.0;
    Ok(r)
}

/// What to compare for one model.
pub struct Plan<'a> {
    pub name: &'a str,
    pub reference_label: &'a str,
    pub prompt: &'a [u32],
    pub greedy_tokens: usize,
    /// Continuation appended to `prompt` for the batch-invariance rows.
    pub continuation: &'a [u32],
}

/// Compares `device` with `reference` (when given) and measures batch invariance on `device`.
pub fn compare(
    device: &mut dyn CausalLm,
    reference: Option<&mut dyn CausalLm>,
    plan: &Plan<'_>,
) -> Result<Correctness> {
    let mut c = Correctness {
        model: plan.name.to_string(),
        reference: plan.reference_label.to_string(),
        greedy_tokens: plan.greedy_tokens,
        ..Correctness::default()
    };
    if let Some(reference) = reference {
        let x = device.forward_batch(&[req(1, 0, plan.prompt, ALL)])?;
        let y = reference.forward_batch(&[req(1, 0, plan.prompt, ALL)])?;
        device.release(1);
        reference.release(1);
        c.positions = x[0].rows;
        c.logits_max_abs_diff = Some(max_abs_diff(&x[0].data, &y[0].data));
        c.logits_max_abs = Some(max_abs(&y[0].data));
        let g_dev = greedy(device, 2, plan.prompt, plan.greedy_tokens)?;
        let g_ref = greedy(reference, 2, plan.prompt, plan.greedy_tokens)?;
        c.greedy_first_divergence = g_dev.iter().zip(&g_ref).position(|(a, b)| a != b);
        c.greedy_identical = Some(c.greedy_first_divergence.is_none());
    }
    let mut seq = plan.prompt.to_vec();
    seq.extend_from_slice(plan.continuation);
    c.batch_invariance = Some(batch_invariance(device, &seq, plan.prompt.len(), 10)?);
    Ok(c)
}
