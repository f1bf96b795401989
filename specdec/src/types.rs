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

/// How a draft node proposes tokens. The method is chosen per request (the node's setting is
/// the default) and travels with every block, so the γ controller plans each session with its
/// own method's acceptance and cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum DraftMethod {
    /// A small draft model (autoregressive forwards on the draft node).
    #[default]
    Model,
    /// Prompt lookup: the continuation of the latest earlier occurrence of the context's last
    /// n tokens in the prompt and the session's own output (no model; microseconds per block).
    /// A deterministic proposal: under sampling its q is a point mass.
    Lookup,
    /// Lookup where a match exists, the draft model otherwise.
    Hybrid,
}

impl DraftMethod {
    /// Every method, in label order.
    pub const ALL: [DraftMethod; 3] =
        [DraftMethod::Model, DraftMethod::Lookup, DraftMethod::Hybrid];

    /// The settings / API / metrics label: `model`, `lookup` or `hybrid`.
    pub fn label(self) -> &'static str {
        match self {
            DraftMethod::Model => "model",
            DraftMethod::Lookup => "lookup",
            DraftMethod::Hybrid => "hybrid",
        }
    }

    /// Position in [`DraftMethod::ALL`] (for per-method tables).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether drafting runs the draft model (some or all of the time).
    pub fn uses_model(self) -> bool {
        !matches!(self, DraftMethod::Lookup)
    }
}

impl std::fmt::Display for DraftMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::str::FromStr for DraftMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "model" => Ok(DraftMethod::Model),
            "lookup" => Ok(DraftMethod::Lookup),
            "hybrid" => Ok(DraftMethod::Hybrid),
            other => Err(format!(
                "unknown draft method {other:?}: expected \"model\", \"lookup\" or \"hybrid\""
            )),
        }
    }
}
