//! Pure speculative-decoding core: sampling transforms, acceptance rules, the network-aware γ
//! controller and the estimators that feed it. No I/O, no async, no clock, no global RNG: time and
//! randomness are parameters, so every rule is unit-testable and reproducible.
#![forbid(unsafe_code)]

pub mod error;
pub mod proposal;
pub mod sampling;
pub mod types;
pub mod verify;

pub use error::SpecError;
pub use proposal::{propose, truncate, PROPOSAL_SUM_TOLERANCE};
pub use sampling::{argmax, probs_from_logits, sample};
pub use types::{SamplingParams, SparseDist};
pub use verify::{verify, verify_greedy, verify_sampled, Verdict};
