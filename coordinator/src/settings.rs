//! Typed settings of the coordinator: the embedded `default.toml`, then an optional file, then
//! `EDGESPEC__<SECTION>__<KEY>` environment variables. Validated before any port is bound.

use crate::policy::Policy;
use crate::Error;
use edgespec_runtime::tls::TlsSettings;
use edgespec_runtime::Sources;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Every default, embedded so the binary needs no file.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// All coordinator settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// gRPC listener.
    pub grpc: GrpcSettings,
    /// Admin HTTP listener and its token.
    pub admin: AdminSettings,
    /// Verify-node registry.
    pub registry: RegistrySettings,
    /// Calls to verify nodes.
    pub verify: VerifySettings,
    /// Admission control limits.
    pub admission: AdmissionSettings,
    /// Link (RTT / bandwidth) measurement.
    pub link: LinkSettings,
    /// Per-session acceptance estimation.
    pub acceptance: AcceptanceSettings,
    /// The live-adjustable policy (γ bounds, batching, burst, speculation).
    pub policy: Policy,
    /// Autoscaling signal.
    pub autoscale: AutoscaleSettings,
    /// Transport security (mTLS or explicit plaintext) of the gRPC listener and of the calls
    /// to verify nodes.
    pub tls: TlsSettings,
}

/// `[grpc]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSettings {
    /// Listen address (port 0 allowed).
    pub listen: SocketAddr,
    /// Largest gRPC message accepted or sent (draft stream messages, verify batches).
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping period on every connection (draft streams in, verify calls out).
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A peer that does not answer a keepalive ping within this is gone: its connection (and a
    /// draft node's stream with its sessions) is dropped.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

/// `[admin]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Listen address (port 0 allowed).
    pub listen: SocketAddr,
    /// Bearer token of `/admin/v1/*`; empty refuses every admin request.
    pub token: String,
    /// Serve the admin API over plain HTTP even in mTLS mode (by default it is HTTPS with the
    /// node's certificate whenever `tls.mode = "mtls"`).
    pub plaintext: bool,
}

impl std::fmt::Debug for AdminSettings {
    // The token never reaches a log line, even through `{:?}` of the whole settings.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("listen", &self.listen)
            .field(
                "token",
                &if self.token.is_empty() {
                    "<unset>"
                } else {
                    "<redacted>"
                },
            )
            .field("plaintext", &self.plaintext)
            .finish()
    }
}

/// `[registry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Heartbeat period asked of verify nodes.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a node is down.
    pub missed_heartbeats: u32,
    /// A node with work (queued tokens reported, or a batch of this coordinator in flight) and
    /// no progress (no answered batch, an unchanged `last_progress_unix_ms`) for this long is
    /// quarantined: no new work, its sessions resync elsewhere, until it progresses again.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// A node down (or quarantined and silent) for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub forget_after: Duration,
}

/// `[verify]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySettings {
    /// Deadline of one Verify call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Connection deadline.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Added to `timeout` per prefill row (history of an open or resync) in the batch.
    #[serde(with = "humantime_serde")]
    pub prefill_timeout_per_token: Duration,
    /// Batches in flight per node.
    pub max_inflight_batches: usize,
}

/// `[admission]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSettings {
    /// Tokens queued or in flight per node.
    pub max_queued_tokens_per_node: usize,
    /// Sessions per node (0: the node's capacity).
    pub max_sessions_per_node: usize,
    /// Sessions in total placed by this coordinator replica (not fleet-wide: each replica
    /// counts its own; the verify nodes' own capacity is the fleet-wide limit).
    pub max_sessions_total: usize,
}

/// `[link]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    /// Probe period per draft stream.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Every n-th probe is padded (0: never).
    pub padded_probe_every: u32,
    /// Padding of a bandwidth probe.
    pub probe_padding_bytes: usize,
    /// Half-life of link samples.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
    /// RTT before the first sample.
    #[serde(with = "humantime_serde")]
    pub default_rtt: Duration,
    /// Bandwidth before the first sample (bytes/s).
    pub default_bandwidth_bytes_per_s: f64,
}

/// `[acceptance]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptanceSettings {
    /// α before the first verdict.
    pub prior_alpha: f64,
    /// Trials the prior is worth.
    pub prior_weight: f64,
    /// Half-life of old rounds.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
}

/// `[autoscale]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleSettings {
    /// Target utilisation of a cloud node.
    pub cloud_target_utilization: f64,
    /// Assumed capacity of a cloud node when none is registered.
    pub cloud_node_capacity: u32,
}

impl Default for Settings {
    /// The embedded defaults (ports as in `default.toml`; tests set them to 0).
    fn default() -> Self {
        Self::from_sources(None, false).expect("embedded default.toml is valid")
    }
}

impl Settings {
    /// The embedded defaults with both listeners on `127.0.0.1:0`, for tests and benchmarks.
    pub fn for_tests() -> Self {
        let mut s = Self::default();
        s.grpc.listen = ([127, 0, 0, 1], 0).into();
        s.admin.listen = ([127, 0, 0, 1], 0).into();
        s.tls = TlsSettings::plaintext();
        s
    }

    fn from_sources(path: Option<&Path>, env: bool) -> Result<Self, Error> {
        let sources = Sources {
            env,
            ..Sources::node(DEFAULT_TOML, path)
        };
        let s: Settings = edgespec_runtime::settings::load(sources)
            .map_err(|e| Error::Settings(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks values that deserialisation cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: &str| Err(Error::Settings(format!("`{key}` {why}")));
        if self.grpc.max_message_bytes < 64 * 1024 {
            return bad("grpc.max_message_bytes", "must be at least 65536");
        }
        if self.registry.heartbeat_interval.is_zero() {
            return bad("registry.heartbeat_interval", "must be > 0");
        }
        if self.registry.heartbeat_interval.as_millis() > u128::from(u32::MAX) {
            return bad("registry.heartbeat_interval", "is too long");
        }
        if self.registry.stall_timeout <= self.registry.heartbeat_interval {
            return bad(
                "registry.stall_timeout",
                "must exceed registry.heartbeat_interval (progress is seen through heartbeats)",
            );
        }
        if self.grpc.keepalive_interval.is_zero() || self.grpc.keepalive_timeout.is_zero() {
            return bad(
                "grpc.keepalive_interval",
                "and grpc.keepalive_timeout must be > 0",
            );
        }
        if self.registry.missed_heartbeats == 0 {
            return bad("registry.missed_heartbeats", "must be >= 1");
        }
        if self.verify.timeout.is_zero() {
            return bad("verify.timeout", "must be > 0");
        }
        if self.verify.max_inflight_batches == 0 {
            return bad("verify.max_inflight_batches", "must be >= 1");
        }
        if self.admission.max_queued_tokens_per_node == 0 {
            return bad("admission.max_queued_tokens_per_node", "must be >= 1");
        }
        if self.admission.max_sessions_total == 0 {
            return bad("admission.max_sessions_total", "must be >= 1");
        }
        if self.link.probe_interval.is_zero() {
            return bad("link.probe_interval", "must be > 0");
        }
        let bw = self.link.default_bandwidth_bytes_per_s;
        if !bw.is_finite() || bw <= 0.0 {
            return bad("link.default_bandwidth_bytes_per_s", "must be > 0");
        }
        if !(0.0..=1.0).contains(&self.acceptance.prior_alpha) {
            return bad("acceptance.prior_alpha", "must be in [0, 1]");
        }
        let w = self.acceptance.prior_weight;
        if !w.is_finite() || w < 0.0 {
            return bad("acceptance.prior_weight", "must be >= 0");
        }
        let u = self.autoscale.cloud_target_utilization;
        if !(u > 0.0 && u <= 1.0) {
            return bad("autoscale.cloud_target_utilization", "must be in (0, 1]");
        }
        if self.autoscale.cloud_node_capacity == 0 {
            return bad("autoscale.cloud_node_capacity", "must be >= 1");
        }
        self.policy
            .validate()
            .map_err(|e| Error::Settings(format!("policy.{e}")))
    }
}

/// Loads the settings: embedded defaults, then `path` (if any), then `EDGESPEC__*` env vars.
pub fn load_settings(path: Option<&Path>) -> Result<Settings, Error> {
    Settings::from_sources(path, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::default();
        assert_eq!(s.policy.gamma_max, 8);
        assert_eq!(s.registry.missed_heartbeats, 3);
        assert!(!format!("{s:?}").contains("token = \""));
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("coord-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        std::fs::write(&f, "[policy]\ngama_max = 3\n").unwrap();
        let err = Settings::from_sources(Some(&f), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gama_max"), "{err}");
        std::fs::write(&f, "[policy]\ngamma_min = 9\ngamma_max = 3\n").unwrap();
        let err = Settings::from_sources(Some(&f), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gamma_min"), "{err}");
    }

    #[test]
    fn token_is_redacted_in_debug() {
        let mut s = Settings::for_tests();
        s.admin.token = "s3cret-token".into();
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
