//! Typed settings of the verify node: the embedded `default.toml` (every key with its default),
//! then an optional file, then `EDGESPEC__<SECTION>__<KEY>` environment variables. Unknown keys
//! are errors; values are validated before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgespec_model::DeviceKind;
use edgespec_runtime::tls::TlsSettings;
use edgespec_runtime::Sources;
use serde::Deserialize;

use crate::Error;

/// The embedded base file with every default.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// All settings of a verify node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listener and identity.
    pub server: ServerSettings,
    /// The target model.
    pub model: ModelSettings,
    /// Session limits.
    pub sessions: SessionSettings,
    /// The batcher.
    pub batching: BatchingSettings,
    /// Registration with coordinators.
    pub coordinator: CoordinatorSettings,
    /// Transport security (mTLS or explicit plaintext).
    pub tls: TlsSettings,
    /// The `/metrics`, `/healthz`, `/readyz` HTTP listener.
    pub metrics: MetricsSettings,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Plain HTTP listen address of `/metrics`, `/healthz` and `/readyz` (port 0 allowed).
    pub listen: SocketAddr,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// gRPC listen address (port 0 allowed).
    pub listen: SocketAddr,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Address coordinators dial; empty derives it from the bound address.
    pub advertise_addr: String,
    /// Plaintext gRPC-health-only listener for probes; empty = none.
    pub health_listen: String,
    /// Node id; empty generates one.
    pub node_id: String,
    /// Placement pool label.
    pub pool: String,
    /// How long shutdown waits for in-flight work.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On shutdown, how long the node keeps serving after telling its coordinators it is
    /// draining, while they move its sessions away (stops early once it holds none).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// GGUF file of the target model.
    pub path: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Context cap (0: the model's window).
    pub max_context: usize,
}

/// `[sessions]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Sessions held at once.
    pub capacity: usize,
    /// KV memory budget in bytes.
    pub kv_budget_bytes: u64,
    /// A session without a round for this long may be evicted for a new one; more recently
    /// active sessions are not, and a new session that does not fit is refused (OVERLOADED).
    #[serde(with = "humantime_serde")]
    pub evict_idle_after: Duration,
    /// Longest draft block (γ max).
    pub max_block_tokens: usize,
}

/// `[batching]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingSettings {
    /// Collection window after the first queued request.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Token budget of one forward.
    pub max_batch_tokens: usize,
    /// Most prefill tokens (of opens and resyncs) per forward; a longer history is prefilled
    /// over several forwards, between which other sessions keep being verified.
    pub max_prefill_tokens: usize,
}

/// `[coordinator]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// Coordinator gRPC addresses (`http://host:port`).
    pub addresses: Vec<String>,
    /// Heartbeat period until a coordinator names its own.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Wait between attempts to reach a coordinator that is down.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Timeout of one registration or heartbeat call.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
}

impl Default for Settings {
    /// The embedded defaults, for embedding and tests: the model path is empty (set it before
    /// `App::build`) and `metrics.listen` is `127.0.0.1:0`, so nodes started in one process
    /// (or next to a running one) never contend for the fixed port `default.toml` gives the
    /// binary (`load_settings`).
    fn default() -> Self {
        let mut s: Settings = edgespec_runtime::settings::defaults(DEFAULT_TOML)
            .expect("the embedded default.toml is valid");
        s.metrics.listen = ([127, 0, 0, 1], 0).into();
        s
    }
}

/// Loads settings: embedded defaults, then `path` (if any), then `EDGESPEC__…` env vars
/// (`EDGESPEC__COORDINATOR__ADDRESSES` takes a comma-separated list). Validates the result.
pub fn load_settings(path: Option<&Path>) -> Result<Settings, Error> {
    let sources = Sources::node(DEFAULT_TOML, path).with_env_lists(&["coordinator.addresses"]);
    let settings: Settings =
        edgespec_runtime::settings::load(sources).map_err(|e| Error::Settings(e.to_string()))?;
    settings.validate()?;
    Ok(settings)
}

impl Settings {
    /// Checks values that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Settings(msg));
        if self.model.path.as_os_str().is_empty() {
            return bad("model.path is required (the target model's GGUF file)".into());
        }
        self.device()?;
        if self.server.max_message_bytes < 64 * 1024 {
            return bad("server.max_message_bytes must be at least 65536".into());
        }
        if edgespec_proto::domain::Pool::parse(&self.server.pool).is_none() {
            return bad(format!(
                "server.pool must be \"onprem\" or \"cloud\", not {:?}",
                self.server.pool
            ));
        }
        if self.sessions.capacity == 0 {
            return bad("sessions.capacity must be at least 1".into());
        }
        if self.sessions.kv_budget_bytes == 0 {
            return bad("sessions.kv_budget_bytes must be positive".into());
        }
        if self.batching.max_batch_tokens == 0 {
            return bad("batching.max_batch_tokens must be at least 1".into());
        }
        if self.sessions.max_block_tokens + 1 > self.batching.max_batch_tokens {
            return bad(format!(
                "batching.max_batch_tokens ({}) must exceed sessions.max_block_tokens ({})",
                self.batching.max_batch_tokens, self.sessions.max_block_tokens
            ));
        }
        if self.sessions.max_block_tokens + 1 > self.batching.max_prefill_tokens {
            return bad(format!(
                "batching.max_prefill_tokens ({}) must exceed sessions.max_block_tokens ({}): \
                 the last piece of a prefill carries the draft tokens",
                self.batching.max_prefill_tokens, self.sessions.max_block_tokens
            ));
        }
        if self.coordinator.heartbeat_interval.is_zero() {
            return bad("coordinator.heartbeat_interval must be positive".into());
        }
        if self.coordinator.retry_interval.is_zero() || self.coordinator.rpc_timeout.is_zero() {
            return bad("coordinator.retry_interval and rpc_timeout must be positive".into());
        }
        for addr in &self.coordinator.addresses {
            if !(addr.starts_with("http://") || addr.starts_with("https://")) {
                return bad(format!(
                    "coordinator.addresses: `{addr}` must start with http:// or https://"
                ));
            }
        }
        Ok(())
    }

    /// The parsed `model.device`.
    pub fn device(&self) -> Result<DeviceKind, Error> {
        parse_device(&self.model.device)
    }
}

/// Parses `cpu` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceKind, Error> {
    s.parse()
        .map_err(|e| Error::Settings(format!("model.device: {e}")))
}

/// The device as reported to coordinators.
pub fn device_label(d: DeviceKind) -> String {
    d.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_need_a_model_path() {
        let s = Settings::default();
        assert_eq!(s.batching.window, Duration::from_millis(2));
        // The binary serves metrics on the documented port; embedded nodes on a free one.
        let file: Settings = edgespec_runtime::settings::defaults(DEFAULT_TOML).unwrap();
        assert_eq!(file.metrics.listen, "0.0.0.0:9102".parse().unwrap());
        assert_eq!(s.metrics.listen, "127.0.0.1:0".parse().unwrap());
        assert!(matches!(s.validate(), Err(Error::Settings(m)) if m.contains("model.path")));
        let mut s = s;
        s.model.path = "m.gguf".into();
        s.validate().unwrap();
        s.batching.max_prefill_tokens = s.sessions.max_block_tokens;
        assert!(
            matches!(s.validate(), Err(Error::Settings(m)) if m.contains("max_prefill_tokens"))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[sessions]\ncapacty = 3\n").unwrap();
        let err = load_settings(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("capacty"), "{err}");
        std::fs::write(&file, "[model]\npath = \"x.gguf\"\ndevice = \"gpu\"\n").unwrap();
        let err = load_settings(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("model.device"), "{err}");
    }

    #[test]
    fn environment_overrides_files_and_defaults() {
        // The only test that sets these variables; the others do not depend on them.
        std::env::set_var("EDGESPEC__MODEL__PATH", "/models/t.gguf");
        std::env::set_var("EDGESPEC__COORDINATOR__ADDRESSES", "http://a:1,http://b:2");
        std::env::set_var("EDGESPEC__SESSIONS__CAPACITY", "9");
        let s = load_settings(None);
        for k in [
            "MODEL__PATH",
            "COORDINATOR__ADDRESSES",
            "SESSIONS__CAPACITY",
        ] {
            std::env::remove_var(format!("EDGESPEC__{k}"));
        }
        let s = s.unwrap();
        assert_eq!(s.model.path, PathBuf::from("/models/t.gguf"));
        assert_eq!(s.coordinator.addresses, ["http://a:1", "http://b:2"]);
        assert_eq!(s.sessions.capacity, 9);
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), DeviceKind::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), DeviceKind::Cuda(1));
        assert!(parse_device("cuda:x").is_err());
    }
}
