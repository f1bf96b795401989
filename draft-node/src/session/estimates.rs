//! What the node learns across sessions, kept per drafting method: the draft cost per token
//! (reported in every block and in the hello) and the coordinator's most recent γ (a new
//! session's first γ). One estimate for all methods would price a lookup (microseconds) like a
//! model step on a shared CPU, and a γ = 0 learnt for model drafting would stop lookup sessions
//! from ever drafting.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use edgespec_specdec::DraftMethod;

/// `recent_gamma` before any verdict.
const NO_GAMMA_YET: u32 = u32::MAX;

/// Weight of a new sample in the draft cost EWMA.
const COST_WEIGHT: f32 = 0.2;

/// Node-wide, per-method estimates (lock-free: sessions update them concurrently).
#[derive(Debug)]
pub(crate) struct Estimates {
    /// Draft seconds per token (f32 bits), 0 until measured.
    cost: [AtomicU32; 3],
    /// The coordinator's latest γ for a session of this method with room to use it.
    recent_gamma: [AtomicU32; 3],
}

impl Default for Estimates {
    fn default() -> Self {
        Estimates {
            cost: std::array::from_fn(|_| AtomicU32::new(0f32.to_bits())),
            recent_gamma: std::array::from_fn(|_| AtomicU32::new(NO_GAMMA_YET)),
        }
    }
}

impl Estimates {
    /// Draft seconds per token of `method` (0 before the first measurement).
    pub fn cost(&self, method: DraftMethod) -> f32 {
        f32::from_bits(self.cost[method.index()].load(Ordering::Relaxed))
    }

    /// Folds one measurement of `took` for `tokens` drafted tokens into `method`'s cost.
    pub fn observe_cost(&self, method: DraftMethod, took: Duration, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let x = took.as_secs_f32() / tokens as f32;
        let cell = &self.cost[method.index()];
        let old = f32::from_bits(cell.load(Ordering::Relaxed));
        let new = if old > 0.0 {
            (1.0 - COST_WEIGHT) * old + COST_WEIGHT * x
        } else {
            x
        };
        cell.store(new.to_bits(), Ordering::Relaxed);
    }

    /// The γ a new session of `method` starts with, if the coordinator has chosen one yet.
    pub fn recent_gamma(&self, method: DraftMethod) -> Option<u32> {
        match self.recent_gamma[method.index()].load(Ordering::Relaxed) {
            NO_GAMMA_YET => None,
            g => Some(g),
        }
    }

    /// Records the coordinator's γ for a session of `method`.
    pub fn set_recent_gamma(&self, method: DraftMethod, gamma: u32) {
        self.recent_gamma[method.index()].store(gamma.min(NO_GAMMA_YET - 1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_learn_apart() {
        let e = Estimates::default();
        assert_eq!(e.recent_gamma(DraftMethod::Lookup), None);
        e.set_recent_gamma(DraftMethod::Model, 0);
        assert_eq!(e.recent_gamma(DraftMethod::Model), Some(0));
        assert_eq!(
            e.recent_gamma(DraftMethod::Lookup),
            None,
            "γ = 0 for the model does not stop lookup"
        );
        e.observe_cost(DraftMethod::Model, Duration::from_millis(80), 1);
        e.observe_cost(DraftMethod::Lookup, Duration::from_micros(20), 4);
        assert!((e.cost(DraftMethod::Model) - 0.08).abs() < 1e-6);
        assert!((e.cost(DraftMethod::Lookup) - 5e-6).abs() < 1e-9);
        assert_eq!(e.cost(DraftMethod::Hybrid), 0.0);
        e.observe_cost(DraftMethod::Model, Duration::from_millis(30), 1);
        assert!((e.cost(DraftMethod::Model) - 0.07).abs() < 1e-6, "EWMA");
        e.observe_cost(DraftMethod::Model, Duration::from_secs(1), 0);
        assert!(
            (e.cost(DraftMethod::Model) - 0.07).abs() < 1e-6,
            "no tokens, no sample"
        );
    }
}
