//! The node's load as coordinators see it: sessions, KV bytes, queued tokens, busy fraction and a
//! fitted forward cost (seconds = base + per_token × tokens). Time is passed in.

use std::time::{Duration, SystemTime};

pub use edgespec_proto::domain::Load;

/// `t` as Unix milliseconds (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Exponentially decayed busy time: `fraction` is the share of the last ~`tau` spent busy.
#[derive(Debug, Clone)]
pub struct BusyMeter {
    tau_s: f64,
    acc_s: f64,
    at_s: f64,
}

impl BusyMeter {
    /// A meter with time constant `tau`.
    pub fn new(tau: Duration) -> Self {
        Self {
            tau_s: tau.as_secs_f64().max(1e-3),
            acc_s: 0.0,
            at_s: 0.0,
        }
    }

    fn decay_to(&mut self, now_s: f64) {
        if now_s > self.at_s {
            self.acc_s *= (-(now_s - self.at_s) / self.tau_s).exp();
            self.at_s = now_s;
        }
    }

    /// Records `busy_s` of work that ended at `now_s` (seconds on any monotonic clock).
    pub fn record(&mut self, busy_s: f64, now_s: f64) {
        self.decay_to(now_s);
        self.acc_s += busy_s.max(0.0);
    }

    /// Busy share at `now_s`, in [0, 1].
    pub fn fraction(&mut self, now_s: f64) -> f32 {
        self.decay_to(now_s);
        (self.acc_s / self.tau_s).clamp(0.0, 1.0) as f32
    }
}

/// Exponentially weighted least-squares fit of forward seconds against tokens.
#[derive(Debug, Clone)]
pub struct CostFit {
    decay: f64,
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl CostFit {
    /// A fit where each observation's weight shrinks by `decay` (0 < decay ≤ 1) per newer one.
    pub fn new(decay: f64) -> Self {
        Self {
            decay: decay.clamp(1e-3, 1.0),
            w: 0.0,
            x: 0.0,
            y: 0.0,
            xx: 0.0,
            xy: 0.0,
        }
    }

    /// Adds one forward of `tokens` rows that took `seconds`.
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        let d = self.decay;
        let x = tokens as f64;
        self.w = self.w * d + 1.0;
        self.x = self.x * d + x;
        self.y = self.y * d + seconds;
        self.xx = self.xx * d + x * x;
        self.xy = self.xy * d + x * seconds;
    }

    /// `(base_s, per_token_s)`, both ≥ 0; zeros before any observation. With too little spread
    /// in batch sizes to separate the two, all cost is attributed per token.
    pub fn estimate(&self) -> (f64, f64) {
        if self.w <= 0.0 {
            return (0.0, 0.0);
        }
        let mx = self.x / self.w;
        let my = self.y / self.w;
        let var = self.xx / self.w - mx * mx;
        if var > 0.25 {
            let slope = ((self.xy / self.w - mx * my) / var).max(0.0);
            let base = (my - slope * mx).max(0.0);
            (base, slope)
        } else {
            (0.0, if mx > 0.0 { my / mx } else { 0.0 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_fit_recovers_a_line() {
        let mut f = CostFit::new(1.0);
        assert_eq!(f.estimate(), (0.0, 0.0));
        for t in [1usize, 4, 8, 16, 32] {
            f.observe(t, 0.05 + 0.002 * t as f64);
        }
        let (base, per) = f.estimate();
        assert!((base - 0.05).abs() < 1e-9, "{base}");
        assert!((per - 0.002).abs() < 1e-9, "{per}");
        let mut g = CostFit::new(0.9);
        g.observe(4, 0.08);
        assert_eq!(g.estimate(), (0.0, 0.02));
    }

    #[test]
    fn busy_meter_tracks_share_and_decays() {
        let mut m = BusyMeter::new(Duration::from_secs(1));
        for i in 0..100 {
            m.record(0.005, 0.01 * (i + 1) as f64); // half of every 10 ms
        }
        let f = m.fraction(1.0);
        assert!(f > 0.3 && f < 0.5, "{f}");
        assert!(m.fraction(10.0) < 0.01);
    }
}
