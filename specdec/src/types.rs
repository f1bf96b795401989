//! Small value types shared by the protocol, the nodes and the math.

/// How a session turns logits into a token. `temperature == 0` means greedy (argmax); the
/// transforms are applied in the order temperature → top-k → top-p, identically on the draft
/// and the target side, so p and q are comparable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables the filter.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose mass reaches top_p; 1.0 disables the filter.
    pub top_p: f32,
    /// Seed of the session's RNG (draft and verify sides derive their own streams from it).
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding (argmax), the default.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };

    /// True when tokens are picked by argmax rather than sampled.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::GREEDY
    }
}

/// A sparse probability distribution over token ids: the draft's top-K-truncated, renormalised
/// proposal q for one position. Ids are distinct; probabilities are in (0, 1] and sum to 1
/// (within float tolerance). Every id outside `ids` has probability exactly 0.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparseDist {
    /// Token ids in the support.
    pub ids: Vec<u32>,
    /// Probability of each id, same length as `ids`.
    pub probs: Vec<f32>,
}

impl SparseDist {
    /// Probability of `token` (0 outside the support).
    pub fn prob(&self, token: u32) -> f32 {
        self.ids
            .iter()
            .position(|&t| t == token)
            .map_or(0.0, |i| self.probs[i])
    }
}
