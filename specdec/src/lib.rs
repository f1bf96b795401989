//! Pure speculative-decoding core: sampling transforms, acceptance rules, the network-aware γ
//! controller and the estimators that feed it. No I/O, no async, no clock, no global RNG: time and
//! randomness are parameters, so every rule is unit-testable and reproducible.
#![forbid(unsafe_code)]

pub mod calibration;
pub mod controller;
pub mod cost;
pub mod error;
pub mod estimate;
pub mod gamma;
pub mod proposal;
pub mod rng;
pub mod sampling;
pub mod stats;
pub mod types;
pub mod verify;

pub use calibration::RoundCalibration;
pub use controller::{
    BlockArrival, DraftCaps, DraftSide, GammaController, GammaPolicy, PoolContext, SessionGamma,
};
pub use cost::{VerifyCost, VerifyCostModel, VerifyCostModelConfig};
pub use error::SpecError;
pub use estimate::{AcceptanceEstimator, AcceptancePrior, Ewma, LinkConfig, LinkEstimator};
pub use gamma::{
    expected_tokens, plan, plan_from, round_time_s, tokens_per_s, GammaInputs, GammaPlan, MAX_GAMMA,
};
pub use proposal::{propose, truncate, PROPOSAL_SUM_TOLERANCE};
pub use rng::{round_rng, RngSide};
pub use sampling::{argmax, probs_from_logits, sample};
pub use types::{DraftMethod, SamplingParams, SparseDist};
pub use verify::{verify, verify_greedy, verify_sampled, Verdict};
