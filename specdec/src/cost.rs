//! Verify-cost model: how long one target forward takes as a function of the tokens in its
//! batch, `t_verify(n) = base_s + per_token_s · n`, fitted online from the verify nodes' own
//! reported timings, and the marginal price of verify work when the pool is loaded.

/// A linear verify-time model. `base_s` is paid once per forward (weights streamed, kernel
/// launches); `per_token_s` for each token in the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyCost {
    /// Seconds per forward regardless of its size.
    pub base_s: f64,
    /// Additional seconds per token in the forward.
    pub per_token_s: f64,
}

impl VerifyCost {
    /// A deliberately middle-of-the-road prior (a small target model on a CPU or a shared GPU);
    /// real timings replace it within a few batches.
    pub const PRIOR: Self = Self {
        base_s: 0.03,
        per_token_s: 0.003,
    };

    /// Predicted seconds for a forward over `tokens` tokens.
    pub fn seconds(&self, tokens: usize) -> f64 {
        self.base_s + self.per_token_s * tokens as f64
    }

    /// The cost as priced by a pool at `utilisation` ρ ∈ [0, 1): the per-token price becomes
    /// `per_token_s / (1 − ρ)` (ρ capped at 0.99), the base is unchanged.
    ///
    /// Why: a saturated pool has no idle time, so each token this session adds to a batch delays
    /// everyone queued behind it; in a single-server queue the time a unit of work costs the
    /// system grows like 1/(1 − ρ). The base is shared by the whole batch and does not grow with
    /// this session's γ. Feeding this into the γ objective makes rejected draft tokens — pure
    /// waste of verify work — expensive under load, which shortens γ or turns speculation off.
    pub fn marginal(&self, utilisation: f64) -> VerifyCost {
        let rho = if utilisation.is_finite() {
            utilisation.clamp(0.0, 0.99)
        } else {
            0.99
        };
        VerifyCost {
            base_s: self.base_s,
            per_token_s: self.per_token_s / (1.0 - rho),
        }
    }
}

impl Default for VerifyCost {
    fn default() -> Self {
        Self::PRIOR
    }
}

/// Settings of a [`VerifyCostModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyCostModelConfig {
    /// The model's answer before (and, fading, alongside) the first observations.
    pub prior: VerifyCost,
    /// How many observations the prior is worth.
    pub prior_weight: f64,
    /// Factor every older observation's weight is multiplied by when a new one arrives
    /// (0.95 ≈ a 20-observation window).
    pub forgetting: f64,
    /// Batch size (tokens) of the prior's second anchor point; the first is at 1 token. Kept
    /// small: a far anchor has so much leverage that, once real batches all have one size (a
    /// session at γ = 0), the faded prior would still set the slope.
    pub prior_span_tokens: usize,
}

impl Default for VerifyCostModelConfig {
    fn default() -> Self {
        Self {
            prior: VerifyCost::PRIOR,
            prior_weight: 2.0,
            forgetting: 0.95,
            prior_span_tokens: 8,
        }
    }
}

/// Exponentially-forgetting least squares fit of `seconds = base + per_token · tokens` (the batch
/// form of recursive least squares with a forgetting factor). The prior enters as two weighted
/// pseudo-observations on its own line, so it decides the fit until data outweighs it and then
/// fades like any old observation.
///
/// Batches of one size tell the level but not the slope. When the recent observations no longer
/// spread over sizes (a controller that chose γ = 0 sends one-token batches only), the model keeps
/// the slope it last learnt from spread observations and fits the level, rather than falling back
/// to the prior's slope: a stale prior slope (3 ms/token) priced a 5-token block of a 1.5B target
/// on a CPU at half its measured cost and kept the controller drafting where it did not pay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyCostModel {
    config: VerifyCostModelConfig,
    /// Decayed weighted sums with the prior's pseudo-observations.
    all: Sums,
    /// The same over real observations only.
    obs: Sums,
    /// The slope of the last fit whose observations spread over batch sizes.
    learnt_slope: Option<f64>,
}

/// Decayed weighted sums of 1, x, y, x², xy.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Sums {
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

/// Observations spread over sizes once their weighted variance in tokens reaches this (a spread
/// of half a token).
const MIN_SPREAD_VAR: f64 = 0.25;

impl Sums {
    fn add(&mut self, x: f64, y: f64, w: f64) {
        self.n += w;
        self.sx += w * x;
        self.sy += w * y;
        self.sxx += w * x * x;
        self.sxy += w * x * y;
    }

    fn decay(&mut self, keep: f64) {
        self.n *= keep;
        self.sx *= keep;
        self.sy *= keep;
        self.sxx *= keep;
        self.sxy *= keep;
    }

    /// (mean x, mean y, var x, cov xy); `None` without weight.
    fn moments(&self) -> Option<(f64, f64, f64, f64)> {
        if self.n <= 0.0 {
            return None;
        }
        let mean_x = self.sx / self.n;
        let mean_y = self.sy / self.n;
        Some((
            mean_x,
            mean_y,
            self.sxx / self.n - mean_x * mean_x,
            self.sxy / self.n - mean_x * mean_y,
        ))
    }
}

impl VerifyCostModel {
    /// A model that answers `config.prior` until it has observations.
    pub fn new(config: VerifyCostModelConfig) -> Self {
        let mut m = Self {
            config,
            all: Sums::default(),
            obs: Sums::default(),
            learnt_slope: None,
        };
        let half = config.prior_weight.max(0.0) / 2.0;
        for x in [1, config.prior_span_tokens.max(2)] {
            m.all.add(x as f64, config.prior.seconds(x), half);
        }
        m
    }

    /// Records a forward over `tokens_in_batch` tokens that took `seconds`. Empty batches and
    /// non-finite or negative times are ignored.
    pub fn observe(&mut self, tokens_in_batch: usize, seconds: f64) {
        if tokens_in_batch == 0 || !(seconds.is_finite() && seconds >= 0.0) {
            return;
        }
        let keep = self.config.forgetting.clamp(0.0, 1.0);
        let x = tokens_in_batch as f64;
        for sums in [&mut self.all, &mut self.obs] {
            sums.decay(keep);
            sums.add(x, seconds, 1.0);
        }
        if let Some((_, _, var_x, cov_xy)) = self.obs.moments() {
            if var_x >= MIN_SPREAD_VAR {
                self.learnt_slope = Some((cov_xy / var_x).max(0.0));
            }
        }
    }

    /// The current fit; both coefficients are kept non-negative.
    pub fn cost(&self) -> VerifyCost {
        let Some((mean_x, mean_y, var_x, cov_xy)) = self.all.moments() else {
            return self.config.prior;
        };
        if let Some((ox, oy, ovar, _)) = self.obs.moments() {
            if ovar < MIN_SPREAD_VAR {
                // Recent batches all of about one size tell the level, not the slope: the slope
                // learnt from spread batches, else the prior's.
                let slope = self.learnt_slope.unwrap_or(self.config.prior.per_token_s);
                return non_negative_line(slope, (ox, oy), oy / ox.max(1.0));
            }
        }
        // Observations spread over sizes, or none yet (the prior's two anchors): least squares.
        let slope = if var_x > 0.0 {
            cov_xy / var_x
        } else {
            self.config.prior.per_token_s
        };
        let through_origin = (self.all.sxy / self.all.sxx).max(0.0);
        non_negative_line(slope, (mean_x, mean_y), through_origin)
    }
}

/// The line of `slope` through `(x, y)` with both coefficients kept non-negative: a negative
/// slope becomes the flat line at `y`, and a line that would start below zero is replaced by the
/// one through the origin of slope `origin_slope`.
fn non_negative_line(slope: f64, (x, y): (f64, f64), origin_slope: f64) -> VerifyCost {
    let (base_s, per_token_s) = if slope < 0.0 {
        (y, 0.0)
    } else if y - slope * x < 0.0 {
        (0.0, origin_slope)
    } else {
        (y - slope * x, slope)
    };
    VerifyCost {
        base_s,
        per_token_s,
    }
}

impl Default for VerifyCostModel {
    fn default() -> Self {
        Self::new(VerifyCostModelConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: VerifyCost, b: VerifyCost, tol: f64) -> bool {
        (a.base_s - b.base_s).abs() < tol && (a.per_token_s - b.per_token_s).abs() < tol
    }

    /// Both coefficients within a relative tolerance.
    fn within(a: VerifyCost, b: VerifyCost, rel: f64) -> bool {
        (a.base_s - b.base_s).abs() <= rel * b.base_s
            && (a.per_token_s - b.per_token_s).abs() <= rel * b.per_token_s
    }

    #[test]
    fn seconds_is_linear() {
        let c = VerifyCost {
            base_s: 0.01,
            per_token_s: 0.002,
        };
        assert!((c.seconds(0) - 0.01).abs() < 1e-12);
        assert!((c.seconds(5) - 0.02).abs() < 1e-12);
    }

    #[test]
    fn marginal_inflates_per_token_price_with_load() {
        let c = VerifyCost {
            base_s: 0.01,
            per_token_s: 0.002,
        };
        assert_eq!(c.marginal(0.0), c);
        assert_eq!(c.marginal(-3.0), c);
        let half = c.marginal(0.5);
        assert!((half.per_token_s - 0.004).abs() < 1e-12 && half.base_s == c.base_s);
        assert!((c.marginal(1.0).per_token_s - 0.2).abs() < 1e-9);
        assert!(c.marginal(f64::NAN).per_token_s.is_finite());
    }

    #[test]
    fn answers_the_prior_before_data() {
        let m = VerifyCostModel::default();
        assert!(close(m.cost(), VerifyCost::PRIOR, 1e-12));
    }

    #[test]
    fn recovers_a_line_and_forgets_the_prior() {
        let truth = VerifyCost {
            base_s: 0.008,
            per_token_s: 0.0005,
        };
        let mut m = VerifyCostModel::default();
        for i in 0..200 {
            let tokens = 1 + (i * 7) % 50;
            // ±2% deterministic noise.
            let noise = if i % 2 == 0 { 1.02 } else { 0.98 };
            m.observe(tokens, truth.seconds(tokens) * noise);
        }
        assert!(close(m.cost(), truth, 3e-4), "{:?}", m.cost());
    }

    #[test]
    fn tracks_a_change_within_the_window() {
        let slow = VerifyCost {
            base_s: 0.05,
            per_token_s: 0.004,
        };
        let fast = VerifyCost {
            base_s: 0.01,
            per_token_s: 0.001,
        };
        let mut m = VerifyCostModel::default();
        for i in 0..100 {
            m.observe(1 + i % 20, slow.seconds(1 + i % 20));
        }
        assert!(within(m.cost(), slow, 0.02), "{:?}", m.cost());
        for i in 0..200 {
            m.observe(1 + i % 20, fast.seconds(1 + i % 20));
        }
        assert!(within(m.cost(), fast, 0.02), "{:?}", m.cost());
    }

    #[test]
    fn one_batch_size_fits_the_level_with_the_prior_slope() {
        let mut m = VerifyCostModel::new(VerifyCostModelConfig {
            prior_weight: 0.0,
            ..VerifyCostModelConfig::default()
        });
        for _ in 0..10 {
            m.observe(8, 0.1);
        }
        let c = m.cost();
        assert!((c.per_token_s - VerifyCost::PRIOR.per_token_s).abs() < 1e-12);
        assert!((c.seconds(8) - 0.1).abs() < 1e-9);
    }

    /// A 1.5B target on a CPU (24 ms + 6.3 ms per token): after blocks of several sizes, a long
    /// run of one-token batches (the controller chose γ = 0) keeps the learnt slope and tracks
    /// the level, instead of drifting back to the prior's 3 ms per token.
    #[test]
    fn one_size_after_spread_keeps_the_learnt_slope() {
        let cpu = VerifyCost {
            base_s: 0.0177,
            per_token_s: 0.0063,
        };
        let mut m = VerifyCostModel::default();
        for i in 0..40 {
            m.observe(1 + i % 6, cpu.seconds(1 + i % 6));
        }
        assert!(within(m.cost(), cpu, 0.05), "{:?}", m.cost());
        // The machine gets 10 % slower while only one-token batches run.
        for _ in 0..300 {
            m.observe(1, 1.1 * cpu.seconds(1));
        }
        let c = m.cost();
        // While the old spread fades, the level change at one size leaks into the slope a
        // little (5.6 instead of 6.3 ms here); the prior would say 3.
        assert!(
            (c.per_token_s - cpu.per_token_s).abs() < 0.15 * cpu.per_token_s,
            "{c:?}"
        );
        assert!((c.seconds(1) - 1.1 * cpu.seconds(1)).abs() < 1e-6, "{c:?}");
        // A 5-token block is priced from the learnt slope, not the prior's.
        let prior_priced = c.seconds(1) + 4.0 * VerifyCost::PRIOR.per_token_s;
        assert!(c.seconds(5) > prior_priced + 0.01, "{c:?}");
    }

    #[test]
    fn coefficients_stay_non_negative() {
        let mut m = VerifyCostModel::new(VerifyCostModelConfig {
            prior_weight: 0.0,
            ..VerifyCostModelConfig::default()
        });
        // Bigger batches faster (noise): slope clamps to 0.
        m.observe(1, 0.02);
        m.observe(10, 0.01);
        let c = m.cost();
        assert!(c.per_token_s == 0.0 && c.base_s > 0.0, "{c:?}");
        // Steep line through below the origin: base clamps to 0.
        let mut m = VerifyCostModel::new(VerifyCostModelConfig {
            prior_weight: 0.0,
            ..VerifyCostModelConfig::default()
        });
        m.observe(10, 0.01);
        m.observe(20, 0.03);
        let c = m.cost();
        assert!(c.base_s == 0.0 && c.per_token_s > 0.0, "{c:?}");
        // Garbage is ignored.
        m.observe(0, 1.0);
        m.observe(5, f64::NAN);
        m.observe(5, -1.0);
        assert_eq!(m.cost(), c);
    }
}
