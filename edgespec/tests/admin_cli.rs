//! `edgespec admin` against a real coordinator on 127.0.0.1:0: the built binary is run as an
//! operator would run it, and what it does is checked through the admin API itself.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgespec_proto::pb;
use edgespec_proto::pb::coordinator_client::CoordinatorClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "admin-cli-test-token";

/// A coordinator running in this process until the token is cancelled.
struct Coordinator {
    grpc: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), edgespec_coordinator::Error>>,
}

impl Coordinator {
    async fn start(mut settings: edgespec_coordinator::Settings) -> Result<Coordinator> {
        settings.admin.token = TOKEN.into();
        // The fake verify node below never heartbeats: keep it up for the whole test.
        settings.registry.heartbeat_interval = Duration::from_secs(60);
        settings.registry.stall_timeout = Duration::from_secs(600);
        let app = edgespec_coordinator::App::build(settings).await?;
        let (grpc, admin) = (app.grpc_addr(), app.http_addr());
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run(stop.clone().cancelled_owned()));
        Ok(Coordinator {
            grpc,
            admin,
            stop,
            task,
        })
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }

    /// Registers a verify node `id` (plaintext coordinators only) that never serves a Verify.
    async fn register_verifier(&self, id: &str, pool: &str) -> Result<()> {
        let mut c = CoordinatorClient::connect(format!("http://{}", self.grpc)).await?;
        c.register_verifier(pb::RegisterVerifierRequest {
            info: Some(pb::NodeInfo {
                node_id: id.into(),
                advertise_addr: "http://127.0.0.1:9".into(),
                pool: pool.into(),
                model_name: "target".into(),
                fingerprint: "0".repeat(64),
                vocab_size: 100,
                max_context: 512,
                capacity_sessions: 8,
                max_block_tokens: 8,
                max_batch_tokens: 64,
                device: "cpu".into(),
                load: None,
            }),
        })
        .await?;
        Ok(())
    }

    /// `GET path` on the admin API, as JSON.
    async fn api(&self, path: &str) -> Result<Value> {
        Ok(reqwest::Client::new()
            .get(format!("http://{}{path}", self.admin))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The admin state of verify node `id`, as the API reports it.
    async fn admin_state(&self, id: &str) -> Result<String> {
        let nodes = self.api("/admin/v1/nodes").await?;
        let node = nodes["verifiers"]
            .as_array()
            .and_then(|v| v.iter().find(|n| n["id"] == id))
            .with_context(|| format!("{id} not in {nodes}"))?;
        Ok(node["admin"].as_str().unwrap_or_default().to_string())
    }
}

/// Runs `edgespec admin <args>` with `token` in EDGESPEC_ADMIN_TOKEN (none if `None`).
async fn edgespec_admin(args: &[&str], token: Option<&str>) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_edgespec"));
    cmd.arg("admin")
        .args(args)
        .env_remove("EDGESPEC_ADMIN_TOKEN");
    cmd.env_remove("EDGESPEC_ADMIN_URL")
        .env_remove("EDGESPEC_ADMIN_CA");
    if let Some(t) = token {
        cmd.env("EDGESPEC_ADMIN_TOKEN", t);
    }
    Ok(cmd.output().await?)
}

/// Runs it, requires success, returns stdout.
async fn ok(args: &[&str]) -> Result<String> {
    let out = edgespec_admin(args, Some(TOKEN)).await?;
    ensure!(
        out.status.success(),
        "edgespec admin {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The table row that starts with `first`.
fn row<'a>(text: &'a str, first: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(first))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_act_on_the_coordinator() -> Result<()> {
    let coord = Coordinator::start(edgespec_coordinator::Settings::for_tests()).await?;
    coord.register_verifier("gpu-a", "onprem").await?;
    coord.register_verifier("gpu-b", "cloud").await?;
    let url = format!("http://{}", coord.admin);
    let url = url.as_str();

    let nodes = ok(&["--url", url, "nodes"]).await?;
    let a = row(&nodes, "gpu-a").with_context(|| nodes.clone())?;
    ensure!(
        a.contains("onprem") && a.contains("up") && a.contains("active"),
        "{nodes}"
    );

    // drain: the CLI says so, and the API shows it afterwards.
    let out = ok(&["--url", url, "drain", "gpu-a"]).await?;
    ensure!(out.trim() == "gpu-a: draining", "{out}");
    ensure!(coord.admin_state("gpu-a").await? == "draining");
    ensure!(coord.admin_state("gpu-b").await? == "active");
    let nodes = ok(&["--url", url, "nodes"]).await?;
    ensure!(
        row(&nodes, "gpu-a").is_some_and(|r| r.contains("draining")),
        "{nodes}"
    );

    ok(&["--url", url, "cordon", "gpu-b"]).await?;
    ensure!(coord.admin_state("gpu-b").await? == "cordoned");
    let out = ok(&["--url", url, "uncordon", "gpu-a"]).await?;
    ensure!(out.trim() == "gpu-a: active", "{out}");
    ensure!(coord.admin_state("gpu-a").await? == "active");

    // An unknown node is an error naming it, with a non-zero exit.
    let out = edgespec_admin(&["--url", url, "drain", "gpu-zz"], Some(TOKEN)).await?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("gpu-zz"));

    // policy get / set, checked through the API.
    let policy = ok(&["--url", url, "policy", "get"]).await?;
    ensure!(row(&policy, "gamma_max").is_some(), "{policy}");
    let out = ok(&[
        "--url",
        url,
        "policy",
        "set",
        "gamma_max=3",
        "initial_gamma=2",
        "batch_window=7ms",
    ])
    .await?;
    ensure!(
        row(&out, "gamma_max").is_some_and(|r| r.ends_with(" 3")),
        "{out}"
    );
    let policy = coord.api("/admin/v1/policy").await?;
    ensure!(policy["gamma_max"] == 3, "{policy}");
    ensure!(policy["initial_gamma"] == 2, "{policy}");
    ensure!(policy["batch_window"] == "7ms", "{policy}");
    let out = edgespec_admin(&["--url", url, "policy", "set", "gamma_min=9"], Some(TOKEN)).await?;
    ensure!(!out.status.success(), "an invalid policy was accepted");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("gamma"));

    let sessions = ok(&["--url", url, "sessions"]).await?;
    ensure!(sessions.starts_with("0 sessions"), "{sessions}");
    let json: Value = serde_json::from_str(&ok(&["--url", url, "--json", "sessions"]).await?)?;
    ensure!(json["count"] == 0, "{json}");

    // top: bounded by --iterations, one view each; both sites listed.
    let top = ok(&[
        "--url",
        url,
        "top",
        "--iterations",
        "2",
        "--interval",
        "10ms",
    ])
    .await?;
    ensure!(top.matches("edgespec top").count() == 2, "{top}");
    let onprem = row(&top, "onprem").with_context(|| top.clone())?;
    ensure!(onprem.contains("1/1"), "{top}");
    ensure!(row(&top, "cloud").is_some(), "{top}");

    coord.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_the_environment_or_a_file_and_a_wrong_one_is_refused() -> Result<()> {
    let coord = Coordinator::start(edgespec_coordinator::Settings::for_tests()).await?;
    let url = format!("http://{}", coord.admin);

    let out = edgespec_admin(&["--url", &url, "nodes"], None).await?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("EDGESPEC_ADMIN_TOKEN"));

    let out = edgespec_admin(&["--url", &url, "nodes"], Some("wrong")).await?;
    ensure!(!out.status.success(), "a wrong token was accepted");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("401"));

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n"))?;
    let out = edgespec_admin(&["--url", &url, "--token-file", path(&file), "nodes"], None).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("verify nodes (0)"));
    coord.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_admin_apis_are_reached_with_the_fleet_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca_pem, cert, key) = coordinator_certificate()?;
    let ca = dir.path().join("ca.pem");
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::write(&ca, &ca_pem)?;
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    let mut settings = edgespec_coordinator::Settings::for_tests();
    settings.tls = edgespec_runtime::tls::TlsSettings::mtls(&ca, &cert_path, &key_path);
    let coord = Coordinator::start(settings).await?;
    let addr = coord.admin.to_string();

    // host:port with --ca: HTTPS, trusting the fleet CA.
    let policy = ok(&["--url", &addr, "--ca", path(&ca), "policy", "get"]).await?;
    ensure!(row(&policy, "gamma_max").is_some(), "{policy}");
    // An https URL without the CA is refused before any request.
    let out = edgespec_admin(&["--url", &format!("https://{addr}"), "nodes"], Some(TOKEN)).await?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("--ca"));
    // Plain HTTP to the HTTPS port fails.
    let out = edgespec_admin(&["--url", &format!("http://{addr}"), "nodes"], Some(TOKEN)).await?;
    ensure!(!out.status.success());
    coord.stop().await
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// (CA PEM, certificate PEM, key PEM) of a coordinator certificate for 127.0.0.1.
fn coordinator_certificate() -> Result<(String, String, String)> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
    params
        .subject_alt_names
        .push(SanType::URI("spiffe://edgespec/coordinator/c0".try_into()?));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((ca_pem, cert.pem(), key.serialize_pem()))
}
