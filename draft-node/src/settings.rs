//! Typed settings: `default.toml` (embedded, every key) → optional `--config` file →
//! `EDGESPEC__<SECTION>__<KEY>` environment variables. Unknown keys are errors; values are
//! validated before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespec_model::DeviceKind;
use edgespec_runtime::tls::TlsSettings;
use edgespec_runtime::Sources;
use edgespec_specdec::DraftMethod;
use serde::{Deserialize, Deserializer};

use crate::Error;

/// The embedded base file with every key and its default.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// All draft-node settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Node identity.
    pub node: NodeSettings,
    /// The draft model.
    pub model: ModelSettings,
    /// The OpenAI-compatible HTTP API.
    pub http: HttpSettings,
    /// The coordinator link.
    pub coordinator: CoordinatorSettings,
    /// The drafting loop.
    pub drafting: DraftingSettings,
    /// Request limits.
    pub limits: LimitSettings,
    /// Transport security (mTLS or explicit plaintext) of the coordinator link.
    pub tls: TlsSettings,
    /// What `/metrics` breaks down.
    pub metrics: MetricsSettings,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Prompt kinds a request may name (`"prompt_kind"`, an extension field) to have its
    /// acceptance counted under that `kind` label; any other name counts as `other`.
    pub prompt_kinds: Vec<String>,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Stable node id; empty = generated at start.
    pub id: String,
}

/// `[model]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// Draft model GGUF (not needed by a node that only drafts by lookup).
    pub path: PathBuf,
    /// GGUF whose tokenizer metadata the node uses (only metadata is read); empty = `path`.
    /// Lets a lookup-only node point at the target's GGUF instead of a draft model.
    pub tokenizer: PathBuf,
    /// Name served on `/v1/models` and expected in requests.
    pub served_name: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Logits only for token ids below this (plus control tokens); 0 = the whole vocabulary
    /// (`edgespec_model::forward::LoadOptions::head_vocab`).
    pub head_vocab: usize,
}

impl ModelSettings {
    /// The GGUF the tokenizer (and the model facts of the hello) come from.
    pub fn tokenizer_path(&self) -> &Path {
        if self.tokenizer.as_os_str().is_empty() {
            &self.path
        } else {
            &self.tokenizer
        }
    }

    /// How the draft model is loaded.
    pub fn load_options(&self) -> edgespec_model::forward::LoadOptions {
        edgespec_model::forward::LoadOptions {
            head_vocab: (self.head_vocab > 0).then_some(self.head_vocab),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Listen address (port 0 allowed).
    pub listen: SocketAddr,
}

/// `[coordinator]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// gRPC address, e.g. `http://10.0.0.2:50051`.
    pub address: String,
    /// How long the coordinator may be away before requests fail with 503.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// One connection attempt's timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Resyncs (the verify side lost a session's state) one request survives; the next one
    /// fails it with 503.
    pub max_resyncs: u32,
}

/// `[drafting]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraftingSettings {
    /// Largest γ this node drafts per block, announced in its hello: the coordinator's γ
    /// controller plans within it (and within its own `policy.gamma_max`).
    pub max_gamma: u32,
    /// K of the sparse draft distribution when sampling.
    pub top_k: u32,
    /// Pipelined drafting on/off.
    pub pipeline: bool,
    /// Most sessions per batched draft forward.
    pub max_batch_sessions: usize,
    /// How sessions draft unless a request names a method (`"draft_method"`): `model`,
    /// `lookup` or `hybrid`. A `lookup` node loads no draft model at all.
    #[serde(deserialize_with = "draft_method")]
    pub method: DraftMethod,
    /// Prompt lookup (`lookup`, and `hybrid` where a match exists).
    pub lookup: LookupSettings,
}

/// `[drafting.lookup]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSettings {
    /// Shortest suffix of the context matched against earlier positions.
    pub min_ngram: usize,
    /// Longest suffix tried (first: the longest match wins).
    pub max_ngram: usize,
    /// Tokens of recent sessions (prompt and output) kept node-wide for lookups that find no
    /// match in their own session; 0 = off. Shares text across clients: one tenant per node.
    pub cache_tokens: usize,
}

/// Largest `drafting.lookup.cache_tokens` (about 100 bytes of memory per token at the default
/// n-gram lengths).
pub const MAX_CACHE_TOKENS: usize = 1 << 24;

/// Longest n-gram prompt lookup matches (`drafting.lookup.max_ngram`).
pub const MAX_NGRAM: usize = 8;

fn draft_method<'de, D: Deserializer<'de>>(d: D) -> Result<DraftMethod, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: u32,
    /// `max_tokens` when a request sets none.
    pub default_max_tokens: u32,
    /// Longest prompt in tokens.
    pub max_prompt_tokens: u32,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Concurrent generations; more get 429.
    pub max_concurrent_sessions: usize,
    /// Most stop strings per request (OpenAI allows 4).
    pub max_stop_strings: usize,
    /// Longest stop string in bytes.
    pub max_stop_len: usize,
    /// How long a request may wait for a generation slot (and for the coordinator to stop
    /// refusing its first block as overloaded) before it is answered 429; 0 = not at all.
    #[serde(with = "humantime_serde")]
    pub admission_wait: Duration,
    /// `Retry-After` of a 429, rounded up to whole seconds.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for Settings {
    /// The embedded defaults (`model.path` is empty and must be set before `validate`).
    fn default() -> Self {
        edgespec_runtime::settings::defaults(DEFAULT_TOML)
            .expect("the embedded default.toml deserializes into Settings")
    }
}

/// Loads the defaults, then `path` (if any), then `EDGESPEC__*` environment variables, and
/// validates the result.
pub fn load_settings(path: Option<&Path>) -> Result<Settings, Error> {
    let settings: Settings = edgespec_runtime::settings::load(Sources::node(DEFAULT_TOML, path))
        .map_err(|e| Error::Settings(e.to_string()))?;
    settings.validate()?;
    Ok(settings)
}

impl Settings {
    /// Checks values that the types alone do not (called by `load_settings` and `App::build`).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| Err(Error::Settings(format!("{key}: {why}")));
        let method = self.drafting.method;
        if method.uses_model() && self.model.path.as_os_str().is_empty() {
            return bad(
                "model.path",
                "must name the draft model GGUF file (drafting.method is \"model\" or \"hybrid\")",
            );
        }
        if self.model.tokenizer_path().as_os_str().is_empty() {
            return bad(
                "model.path",
                "must name the draft model GGUF file, or model.tokenizer a GGUF whose \
                 tokenizer a lookup-only node uses",
            );
        }
        if self.model.served_name.trim().is_empty() {
            return bad("model.served_name", "must not be empty");
        }
        self.device()?;
        if self.model.head_vocab > 0 && self.model.head_vocab < 256 {
            return bad(
                "model.head_vocab",
                "must be 0 (whole vocabulary) or at least 256 (the byte tokens)",
            );
        }
        if !(self.coordinator.address.starts_with("http://")
            || self.coordinator.address.starts_with("https://"))
        {
            return bad(
                "coordinator.address",
                "must be a URL such as http://127.0.0.1:50051",
            );
        }
        let c = &self.coordinator;
        for (key, d) in [
            ("coordinator.timeout", c.timeout),
            ("coordinator.connect_timeout", c.connect_timeout),
            ("coordinator.backoff_initial", c.backoff_initial),
            ("coordinator.backoff_max", c.backoff_max),
        ] {
            if d.is_zero() {
                return bad(key, "must be greater than zero");
            }
        }
        if c.max_resyncs == 0 {
            return bad("coordinator.max_resyncs", "must be at least 1");
        }
        if c.backoff_initial > c.backoff_max {
            return bad(
                "coordinator.backoff_initial",
                "must not exceed coordinator.backoff_max",
            );
        }
        let d = &self.drafting;
        if d.max_gamma as usize > edgespec_specdec::MAX_GAMMA {
            return bad(
                "drafting.max_gamma",
                "must be at most 64 (the protocol's ceiling on γ)",
            );
        }
        if d.top_k == 0 || d.top_k as usize > edgespec_proto::domain::MAX_DIST_SUPPORT {
            return bad(
                "drafting.top_k",
                "must be between 1 and 256 (the protocol's cap on a draft distribution)",
            );
        }
        if d.max_batch_sessions == 0 {
            return bad("drafting.max_batch_sessions", "must be at least 1");
        }
        let lk = &d.lookup;
        if !(1..=MAX_NGRAM).contains(&lk.min_ngram) {
            return bad("drafting.lookup.min_ngram", "must be between 1 and 8");
        }
        if !(1..=MAX_NGRAM).contains(&lk.max_ngram) || lk.max_ngram < lk.min_ngram {
            return bad(
                "drafting.lookup.max_ngram",
                "must be between drafting.lookup.min_ngram and 8",
            );
        }
        if lk.cache_tokens > MAX_CACHE_TOKENS {
            return bad(
                "drafting.lookup.cache_tokens",
                "must be at most 16777216 (0 = off)",
            );
        }
        let kinds = &self.metrics.prompt_kinds;
        if kinds.len() > 32
            || kinds.iter().any(|k| {
                k.is_empty()
                    || k.len() > 32
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            })
        {
            return bad(
                "metrics.prompt_kinds",
                "must be at most 32 names of 1 to 32 characters [a-z0-9_]",
            );
        }
        let l = &self.limits;
        if l.max_tokens == 0 {
            return bad("limits.max_tokens", "must be at least 1");
        }
        if l.default_max_tokens == 0 || l.default_max_tokens > l.max_tokens {
            return bad(
                "limits.default_max_tokens",
                "must be in 1..=limits.max_tokens",
            );
        }
        if l.max_prompt_tokens == 0 {
            return bad("limits.max_prompt_tokens", "must be at least 1");
        }
        if l.max_body_bytes < 1024 {
            return bad("limits.max_body_bytes", "must be at least 1024");
        }
        if l.max_concurrent_sessions == 0 {
            return bad("limits.max_concurrent_sessions", "must be at least 1");
        }
        if l.max_stop_strings == 0 {
            return bad("limits.max_stop_strings", "must be at least 1");
        }
        if l.max_stop_len == 0 {
            return bad("limits.max_stop_len", "must be at least 1");
        }
        if l.retry_after < Duration::from_secs(1) {
            return bad("limits.retry_after", "must be at least 1s");
        }
        Ok(())
    }

    /// The parsed `model.device`.
    pub fn device(&self) -> Result<DeviceKind, Error> {
        self.model
            .device
            .parse()
            .map_err(|e| Error::Settings(format!("model.device: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_deserialize_and_need_a_model_path() {
        let s = Settings::default();
        assert!(
            !s.drafting.pipeline,
            "pipelining is off by default (it lost the benchmark)"
        );
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("model.path"), "{err}");
    }

    #[test]
    fn overload_limits_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let base = "[model]\npath = \"/m.gguf\"\n[limits]\n";
        std::fs::write(&p, format!("{base}admission_wait = \"0s\"\n")).unwrap();
        let s = load_settings(Some(&p)).unwrap();
        assert!(s.limits.admission_wait.is_zero(), "0s: 429 at once");
        assert_eq!(Settings::default().limits.max_stop_strings, 4);
        for (line, key) in [
            ("max_stop_strings = 0", "limits.max_stop_strings"),
            ("max_stop_len = 0", "limits.max_stop_len"),
            ("retry_after = \"500ms\"", "limits.retry_after"),
        ] {
            std::fs::write(&p, format!("{base}{line}\n")).unwrap();
            let err = load_settings(Some(&p)).unwrap_err().to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn drafting_methods_and_lookup_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let s = Settings::default();
        assert_eq!(s.drafting.method, DraftMethod::Model, "model by default");
        assert!(s.drafting.lookup.min_ngram <= s.drafting.lookup.max_ngram);
        assert_eq!(
            s.drafting.lookup.cache_tokens, 0,
            "no cross-session cache by default"
        );
        // A lookup node needs a tokenizer, not a draft model.
        std::fs::write(
            &p,
            "[model]\ntokenizer = \"/t.gguf\"\n[drafting]\nmethod = \"lookup\"\n",
        )
        .unwrap();
        let s = load_settings(Some(&p)).unwrap();
        assert_eq!(s.drafting.method, DraftMethod::Lookup);
        assert_eq!(s.model.tokenizer_path(), Path::new("/t.gguf"));
        std::fs::write(
            &p,
            "[model]\npath = \"/m.gguf\"\n[drafting]\nmethod = \"lookup\"\n",
        )
        .unwrap();
        let s = load_settings(Some(&p)).unwrap();
        assert_eq!(
            s.model.tokenizer_path(),
            Path::new("/m.gguf"),
            "empty: model.path"
        );
        for (toml, key) in [
            ("[drafting]\nmethod = \"lookup\"\n", "model.path"),
            (
                "[model]\ntokenizer = \"/t.gguf\"\n[drafting]\nmethod = \"hybrid\"\n",
                "model.path",
            ),
            ("[model]\ntokenizer = \"/t.gguf\"\n", "model.path"),
            (
                "[model]\npath = \"/m.gguf\"\n[drafting]\nmethod = \"ngram\"\n",
                "ngram",
            ),
            (
                "[model]\npath = \"/m.gguf\"\n[drafting.lookup]\nmin_ngram = 0\n",
                "drafting.lookup.min_ngram",
            ),
            (
                "[model]\npath = \"/m.gguf\"\n[drafting.lookup]\nmax_ngram = 9\n",
                "drafting.lookup.max_ngram",
            ),
            (
                "[model]\npath = \"/m.gguf\"\n[drafting.lookup]\ncache_tokens = 16777217\n",
                "drafting.lookup.cache_tokens",
            ),
            (
                "[model]\npath = \"/m.gguf\"\n[drafting.lookup]\nmin_ngram = 4\nmax_ngram = 3\n",
                "drafting.lookup.max_ngram",
            ),
        ] {
            std::fs::write(&p, toml).unwrap();
            let err = load_settings(Some(&p)).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[drafting]\npipline = false\n").unwrap();
        let err = load_settings(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("pipline"), "{err}");
    }

    #[test]
    fn file_values_override_defaults_and_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[model]\npath = \"/m.gguf\"\ndevice = \"cuda:1\"\n[coordinator]\ntimeout = \"250ms\"\n",
        )
        .unwrap();
        let s = load_settings(Some(&p)).unwrap();
        assert_eq!(s.coordinator.timeout, Duration::from_millis(250));
        assert_eq!(s.device().unwrap(), DeviceKind::Cuda(1));
        std::fs::write(
            &p,
            "[model]\npath = \"/m.gguf\"\n[drafting]\nmax_gamma = 65\n",
        )
        .unwrap();
        let err = load_settings(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("drafting.max_gamma"), "{err}");
        std::fs::write(&p, "[model]\npath = \"/m.gguf\"\nhead_vocab = 100\n").unwrap();
        let err = load_settings(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("model.head_vocab"), "{err}");
        std::fs::write(&p, "[model]\npath = \"/m.gguf\"\nhead_vocab = 65536\n").unwrap();
        let s = load_settings(Some(&p)).unwrap();
        assert_eq!(s.model.load_options().head_vocab, Some(65536));
        assert_eq!(Settings::default().model.load_options().head_vocab, None);
    }
}
