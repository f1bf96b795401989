//! Small shared pieces: the time budget, deterministic token streams, prefills.

use std::time::{Duration, Instant};

use anyhow::Result;
use edgespec_model::forward::load_gguf;
use edgespec_model::{CausalLm, DeviceKind, SeqRequest, SessionId};

/// A wall-clock deadline that sections check before each unit of work.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Whether the deadline has passed.
    pub fn passed(self) -> bool {
        Instant::now() >= self.0
    }

    /// A deadline `fraction` of the way from now to this one.
    pub fn share(self, fraction: f64) -> Deadline {
        let now = Instant::now();
        let left = self.0.saturating_duration_since(now);
        Deadline(now + Duration::from_secs_f64(left.as_secs_f64() * fraction.clamp(0.0, 1.0)))
    }
}

/// splitmix64: a deterministic hash (the corruption pattern of the verify bench).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `len` token ids below `vocab`, a function of `seed` only.
pub fn tokens(seed: u64, len: usize, vocab: usize) -> Vec<u32> {
    (0..len as u64)
        .map(|i| (mix(seed.wrapping_mul(0x1000_0001) ^ i) % vocab as u64) as u32)
        .collect()
}

/// Largest |a - b| over two equally long slices (NaN counts as infinite).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x as f64 - *y as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

/// Largest |x| of a slice.
pub fn max_abs(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).abs()).fold(0.0, f64::max)
}

/// Loads a model, returning it with the load time.
pub fn load(path: &std::path::Path, device: DeviceKind) -> Result<(Box<dyn CausalLm>, f64)> {
    let t = Instant::now();
    let m = load_gguf(path, device)?;
    Ok((m, t.elapsed().as_secs_f64()))
}

/// Prompt rows per prefill forward: the deadline is checked between forwards (a 4096-row
/// forward of the 1.5B takes minutes on two CPU cores).
pub const PREFILL_ROWS: usize = 1024;

/// Prefills `sessions[i]` with `prompts[i]` (new sessions), at most `rows_per_forward` prompt
/// rows per forward (more for a longer prompt); returns each session's last-position logit
/// row's argmax, or `None` (sessions released) when the deadline passed between forwards.
pub fn prefill(
    model: &mut dyn CausalLm,
    sessions: &[SessionId],
    prompts: &[Vec<u32>],
    rows_per_forward: usize,
    deadline: Deadline,
) -> Result<Option<Vec<u32>>> {
    let mut firsts = Vec::with_capacity(sessions.len());
    let mut i = 0;
    while i < sessions.len() {
        if deadline.passed() {
            for s in sessions {
                model.release(*s);
            }
            return Ok(None);
        }
        let mut batch = Vec::new();
        let mut rows = 0;
        while i < sessions.len()
            && (batch.is_empty() || rows + prompts[i].len() <= rows_per_forward)
        {
            rows += prompts[i].len();
            batch.push(SeqRequest {
                session: sessions[i],
                start: 0,
                tokens: prompts[i].clone(),
                logits_for_last: 1,
            });
            i += 1;
        }
        for l in model.forward_batch(&batch)? {
            firsts.push(edgespec_specdec::argmax(l.row(l.rows - 1)));
        }
    }
    Ok(Some(firsts))
}

/// Median of the samples (0 when there are none).
pub fn median(v: Vec<f64>) -> f64 {
    edgespec_specdec::stats::median(&v).unwrap_or(0.0)
}
