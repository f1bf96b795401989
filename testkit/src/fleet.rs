//! Waiting for a fleet through its coordinator's admin API (`GET /admin/v1/nodes`): the one
//! readiness check of the local cluster, the child-process fleets and the benchmarks.

use std::time::Duration;

use anyhow::{bail, Result};

/// (verify nodes registered and up, draft nodes connected) in a `GET /admin/v1/nodes` answer.
pub fn fleet_counts(nodes: &serde_json::Value) -> (usize, usize) {
    let up = nodes["verifiers"].as_array().map_or(0, |a| {
        a.iter()
            .filter(|n| n["health"].as_str() == Some("up"))
            .count()
    });
    let drafts = nodes["drafts"].as_array().map_or(0, Vec::len);
    (up, drafts)
}

/// A coordinator's admin API, as seen by a waiting client.
#[derive(Debug, Clone)]
pub struct AdminApi {
    /// Client (trusting the fleet CA where the API is HTTPS).
    pub client: reqwest::Client,
    /// Base URL, `http(s)://host:port`.
    pub base: String,
    /// Bearer token.
    pub token: String,
}

impl AdminApi {
    /// Plain HTTP at `addr` with `token`.
    pub fn http(addr: std::net::SocketAddr, token: &str) -> Self {
        Self {
            client: reqwest::Client::new(),
            base: format!("http://{addr}"),
            token: token.into(),
        }
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value> {
        Ok(self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(5))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Polls `/admin/v1/nodes` every `want.poll` until at least `want.verifiers` verify nodes are
    /// up and `want.drafts` draft nodes connected. Before each poll `alive` may fail the wait at
    /// once (a child process that exited).
    pub async fn wait_fleet(
        &self,
        want: FleetWait,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let until = tokio::time::Instant::now() + want.timeout;
        loop {
            alive()?;
            let (up, drafts) = match self.get("/admin/v1/nodes").await {
                Ok(v) => fleet_counts(&v),
                Err(_) => (0, 0),
            };
            if up >= want.verifiers && drafts >= want.drafts {
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                bail!(
                    "within {:?} only {up} of {} verify nodes registered and {drafts} of {} draft \
                     nodes connected",
                    want.timeout,
                    want.verifiers,
                    want.drafts
                );
            }
            tokio::time::sleep(want.poll).await;
        }
    }
}

/// What [`AdminApi::wait_fleet`] waits for.
#[derive(Debug, Clone, Copy)]
pub struct FleetWait {
    /// Verify nodes up.
    pub verifiers: usize,
    /// Draft nodes connected.
    pub drafts: usize,
    /// Give up after this long.
    pub timeout: Duration,
    /// Poll period.
    pub poll: Duration,
}

impl FleetWait {
    /// `verifiers` up and `drafts` connected within `timeout`, polling every 50 ms.
    pub fn new(verifiers: usize, drafts: usize, timeout: Duration) -> Self {
        Self {
            verifiers,
            drafts,
            timeout,
            poll: Duration::from_millis(50),
        }
    }
}
