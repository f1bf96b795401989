//! The reference every exactness check compares with: target-only greedy decoding of a chat
//! prompt directly on the model, one token per forward, exactly as a non-speculative server
//! would run it. It lives in `edgespec_testkit::reference` (the node crates' tests use it too);
//! this is its name in the operator CLI's crate, for the chaos soak and the end-to-end tests.

pub use edgespec_testkit::reference::{target_only_greedy, target_only_greedy_ids};
