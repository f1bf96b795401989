//! The real node binaries as child processes, for tests that kill them the hard way
//! (`SIGKILL`, `SIGSTOP`), which an in-process node cannot model.
//!
//! The binaries are the ones cargo builds into the same target folder as the running executable
//! (`target/<profile>/edgespec-{coordinator,verify-node,draft-node}`; `cargo test --workspace`
//! and `cargo build` both build them). Each child is configured
//! only through `EDGESPEC__SECTION__KEY` environment variables, on loopback, in plaintext, and
//! is killed when its handle is dropped, so a failing test leaves no process behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use edgespec_testkit::fleet::{AdminApi, FleetWait};
use tokio::process::{Child, Command};

/// Admin token of the coordinators started here.
pub const ADMIN_TOKEN: &str = "procs-test-token";

/// A free loopback port (bound, read, released: the child binds it right after).
pub use edgespec_testkit::harness::free_addr;

/// Path of a workspace binary built into the same target folder as the running executable
/// (`target/<profile>/edgespec` itself, or a test in `target/<profile>/deps/`).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("the executable has no folder")?;
    let candidates = [Some(dir), dir.parent()];
    if let Some(found) = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
    {
        return Ok(found);
    }
    bail!(
        "{name} is not built next to {}: run `cargo build --bins` (or the tests with `cargo test \
         --workspace`, which builds the node binaries)",
        exe.display()
    )
}

/// Which binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `edgespec-coordinator`.
    Coordinator,
    /// `edgespec-verify-node`.
    Verify,
    /// `edgespec-draft-node`.
    Draft,
}

impl Role {
    fn binary(self) -> &'static str {
        match self {
            Role::Coordinator => "edgespec-coordinator",
            Role::Verify => "edgespec-verify-node",
            Role::Draft => "edgespec-draft-node",
        }
    }
}

/// One node process: its role, the settings it was started with (to start it again) and the
/// child.
#[derive(Debug)]
pub struct NodeProcess {
    role: Role,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NodeProcess {
    /// Starts `role` with these `EDGESPEC__…` settings (plus plaintext TLS and quiet logs).
    pub fn start(role: Role, env: &[(&str, String)]) -> Result<NodeProcess> {
        let mut p = NodeProcess {
            role,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            child: None,
        };
        p.restart()?;
        Ok(p)
    }

    /// Starts the process again with the same settings (after a kill).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{:?} is still running", self.role);
        }
        let mut cmd = Command::new(binary(self.role.binary())?);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("EDGESPEC__TLS__MODE", "plaintext")
            .env(
                "RUST_LOG",
                std::env::var("EDGESPEC_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("EDGESPEC_CHILD_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {:?}", self.role))?,
        );
        Ok(())
    }

    /// `SIGKILL`, and waits for the process to be gone.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await.context("SIGKILL")?;
        }
        Ok(())
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) with `kill(1)`.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("the process is not running")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed: {status}");
        }
        Ok(())
    }

    /// Whether the process runs (it has not exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// `GET` an admin path of the coordinator at `admin` as JSON.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<serde_json::Value> {
    AdminApi::http(admin, ADMIN_TOKEN).get(path).await
}

/// Waits until the coordinator at `admin` has `verifiers` verify nodes up and `drafts` draft
/// nodes connected; fails at once, naming it, when one of `procs` exits on its own (a port
/// taken, a bad setting: run with `EDGESPEC_CHILD_LOG=info` to see its log).
pub async fn wait_fleet(
    admin: SocketAddr,
    verifiers: usize,
    drafts: usize,
    procs: &mut [&mut NodeProcess],
) -> Result<()> {
    let want = FleetWait::new(verifiers, drafts, Duration::from_secs(240));
    let alive = || {
        for p in procs.iter_mut() {
            if !p.is_running() {
                bail!(
                    "{:?} exited while the fleet was starting (run with EDGESPEC_CHILD_LOG=info \
                     to see why)",
                    p.role
                );
            }
        }
        Ok(())
    };
    AdminApi::http(admin, ADMIN_TOKEN)
        .wait_fleet(want, alive)
        .await
        .context("the fleet did not come up")
}

/// Settings of a coordinator on fixed addresses with a fixed γ.
pub fn coordinator_env(
    grpc: SocketAddr,
    admin: SocketAddr,
    gamma: u32,
) -> Vec<(&'static str, String)> {
    vec![
        ("EDGESPEC__GRPC__LISTEN", grpc.to_string()),
        ("EDGESPEC__ADMIN__LISTEN", admin.to_string()),
        ("EDGESPEC__ADMIN__TOKEN", ADMIN_TOKEN.into()),
        ("EDGESPEC__REGISTRY__HEARTBEAT_INTERVAL", "200ms".into()),
        ("EDGESPEC__POLICY__GAMMA_MIN", gamma.to_string()),
        ("EDGESPEC__POLICY__GAMMA_MAX", gamma.to_string()),
        ("EDGESPEC__POLICY__INITIAL_GAMMA", gamma.to_string()),
    ]
}

/// Settings of a verify node registering with `coordinators`.
pub fn verify_env(
    id: &str,
    model: &Path,
    listen: SocketAddr,
    coordinators: &[SocketAddr],
) -> Vec<(&'static str, String)> {
    let addrs = coordinators
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        ("EDGESPEC__SERVER__LISTEN", listen.to_string()),
        ("EDGESPEC__SERVER__NODE_ID", id.into()),
        ("EDGESPEC__SERVER__DRAIN_TIMEOUT", "0s".into()),
        ("EDGESPEC__MODEL__PATH", model.display().to_string()),
        ("EDGESPEC__COORDINATOR__ADDRESSES", addrs),
        ("EDGESPEC__COORDINATOR__HEARTBEAT_INTERVAL", "200ms".into()),
        ("EDGESPEC__COORDINATOR__RETRY_INTERVAL", "100ms".into()),
        // Several verify nodes share the machine: none takes the fixed metrics port.
        ("EDGESPEC__METRICS__LISTEN", "127.0.0.1:0".into()),
    ]
}

/// Settings of a draft node serving HTTP on `http` and drafting for the coordinator at `dial`.
pub fn draft_env(
    id: &str,
    model: &Path,
    http: SocketAddr,
    dial: SocketAddr,
) -> Vec<(&'static str, String)> {
    vec![
        ("EDGESPEC__NODE__ID", id.into()),
        ("EDGESPEC__HTTP__LISTEN", http.to_string()),
        ("EDGESPEC__MODEL__PATH", model.display().to_string()),
        ("EDGESPEC__COORDINATOR__ADDRESS", format!("http://{dial}")),
        ("EDGESPEC__COORDINATOR__BACKOFF_INITIAL", "50ms".into()),
        ("EDGESPEC__COORDINATOR__BACKOFF_MAX", "500ms".into()),
    ]
}
