//! Observability of every node (issue 18): the verify node serves `/metrics`, `/healthz` and
//! `/readyz` on `metrics.listen`; every node's `/metrics` carries the notAfter of its own TLS
//! certificate (`edgespec_tls_cert_expiry_timestamp_seconds`); and a coordinator whose
//! certificate files are rotated serves the new certificate (admin HTTPS and gRPC) and reports
//! the new expiry without a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgespec_model::synthetic::{write_tiny_gguf, TinySpec};
use edgespec_runtime::tls::{source_chain, TlsSettings};
use edgespec_testkit::ca::{CertSpec, NodeCert, TestCa as Ca};
use edgespec_testkit::harness::{wait_until, Running};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const GAUGE: &str = "edgespec_tls_cert_expiry_timestamp_seconds";

/// Unix seconds of midnight UTC on these dates (the notAfter each test certificate gets).
const NOT_AFTER_2030_01_01: i64 = 1_893_456_000;
const NOT_AFTER_2031_06_01: i64 = 1_938_038_400;
const NOT_AFTER_2032_03_01: i64 = 1_961_712_000;
const NOT_AFTER_2033_09_01: i64 = 2_009_145_600;

/// A certificate of node `id` of `role` from `ca`, expiring on `not_after`.
fn node(ca: &Ca, role: &str, id: &str, not_after: (i32, u8, u8)) -> Result<NodeCert> {
    ca.sign(CertSpec {
        not_after: Some(not_after),
        ..CertSpec::new(role, id)
    })
}

/// Writes a node's `[tls]` files into `dir` under `name`; returns its settings.
fn write_tls(dir: &Path, name: &str, ca_pem: &str, node: &NodeCert) -> Result<TlsSettings> {
    let (ca, cert, key) = tls_paths(dir, name);
    std::fs::write(&ca, ca_pem)?;
    std::fs::write(&cert, &node.cert)?;
    std::fs::write(&key, &node.key)?;
    Ok(TlsSettings::mtls(ca, cert, key))
}

fn tls_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// The value of the expiry gauge in an exposition.
fn expiry(text: &str) -> Option<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{GAUGE} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// An HTTPS client trusting `ca` only, on a fresh connection (no pool: each request handshakes).
fn https_client(ca: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()?)
}

/// GET `url` over HTTPS trusting `ca`: (body, the DER certificate the server presented).
async fn https_get(ca: &str, url: &str) -> Result<(String, Vec<u8>)> {
    let response = https_client(ca)?.get(url).send().await?;
    let presented = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .context("no TLS info")?
        .to_vec();
    ensure!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    Ok((response.text().await?, presented))
}

/// A gRPC health check of `addr` trusting `ca` and presenting `client`.
async fn grpc_health(addr: SocketAddr, ca: &str, client: &NodeCert) -> Result<()> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(&client.cert, &client.key));
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!(source_chain(&e)))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_reports_its_certificate_expiry_and_the_verify_node_serves_metrics() -> Result<()>
{
    edgespec_tests::init_logs();
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default())?;
    let ca = Ca::new("fleet")?;
    // Each role's certificate expires on another day, so each gauge must be the node's own.
    let coordinator_cert = node(&ca, "coordinator", "c0", (2031, 6, 1))?;
    let verify_cert = node(&ca, "verify", "verify-0", (2032, 3, 1))?;
    let draft_cert = node(&ca, "draft", "draft-0", (2033, 9, 1))?;

    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.tls = write_tls(dir.path(), "coordinator", &ca.pem, &coordinator_cert)?;
    let coordinator = edgespec_coordinator::App::build(cs).await?;
    let (grpc, admin) = (coordinator.grpc_addr(), coordinator.http_addr());
    let coordinator = Running::spawn(|stop| coordinator.run(stop));

    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.clone();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.coordinator.addresses = vec![format!("https://{grpc}")];
    vs.tls = write_tls(dir.path(), "verify", &ca.pem, &verify_cert)?;
    let verify = edgespec_verify_node::App::build(vs).await?;
    let metrics = verify.metrics_addr();
    let verify = Running::spawn(|stop| verify.run(stop));

    let mut ds = edgespec_draft_node::Settings::default();
    ds.model.path = model;
    ds.http.listen = ([127, 0, 0, 1], 0).into();
    ds.coordinator.address = format!("https://{grpc}");
    ds.coordinator.timeout = Duration::from_secs(20);
    ds.coordinator.backoff_initial = Duration::from_millis(50);
    ds.tls = write_tls(dir.path(), "draft", &ca.pem, &draft_cert)?;
    let draft = edgespec_draft_node::App::build(ds).await?;
    let api = draft.http_addr();
    let draft = Running::spawn(|stop| draft.run(stop));

    // The verify node's metrics endpoint: plain HTTP, its own metrics and its certificate.
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("http://{metrics}{path}")).send();
    let text = get("/metrics").await?.text().await?;
    ensure!(
        text.contains("edgespec_verify_forwards_total"),
        "verify /metrics lacks its own metrics:\n{text}"
    );
    ensure!(
        expiry(&text) == Some(NOT_AFTER_2032_03_01),
        "verify /metrics: {text}"
    );
    ensure!(get("/healthz").await?.status().is_success());
    let ready = get("/readyz").await?;
    ensure!(ready.status().is_success(), "{ready:?}");

    let (text, _) = https_get(&ca.pem, &format!("https://{admin}/metrics")).await?;
    ensure!(
        text.contains("edgespec_coordinator_rounds_total"),
        "coordinator /metrics lacks its own metrics:\n{text}"
    );
    ensure!(
        expiry(&text) == Some(NOT_AFTER_2031_06_01),
        "coordinator /metrics: {text}"
    );

    let text = http
        .get(format!("http://{api}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        text.contains("edgespec_draft_rounds_total"),
        "draft /metrics lacks its own metrics:\n{text}"
    );
    ensure!(
        expiry(&text) == Some(NOT_AFTER_2033_09_01),
        "draft /metrics: {text}"
    );
    ensure!(text.matches("# EOF").count() == 1, "{text}");

    draft.shutdown();
    verify.shutdown();
    coordinator.shutdown();
    draft.close().await?;
    verify.close().await?;
    coordinator.close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_serves_a_rotated_certificate_without_a_restart() -> Result<()> {
    edgespec_tests::init_logs();
    let dir = tempfile::tempdir()?;
    let (ca_a, ca_b) = (Ca::new("A")?, Ca::new("B")?);
    let cert_a = node(&ca_a, "coordinator", "c0", (2030, 1, 1))?;
    let cert_b = node(&ca_b, "coordinator", "c0", (2031, 6, 1))?;
    let client_b = node(&ca_b, "draft", "probe", (2030, 1, 1))?;
    ensure!(cert_a.der != cert_b.der);

    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.tls = TlsSettings {
        reload_interval: Duration::from_millis(50),
        ..write_tls(dir.path(), "coordinator", &ca_a.pem, &cert_a)?
    };
    let coordinator = edgespec_coordinator::App::build(cs).await?;
    let (grpc, admin) = (coordinator.grpc_addr(), coordinator.http_addr());
    let task = Running::spawn(|stop| coordinator.run(stop));
    let metrics_url = format!("https://{admin}/metrics");
    let both = format!("{}{}", ca_a.pem, ca_b.pem);

    let (text, presented) = https_get(&both, &metrics_url).await?;
    ensure!(presented == cert_a.der, "the admin API presents A at first");
    ensure!(expiry(&text) == Some(NOT_AFTER_2030_01_01), "{text}");
    ensure!(
        grpc_health(grpc, &ca_b.pem, &client_b).await.is_err(),
        "a client of CA B reached the gRPC port before the rotation"
    );

    // Rotate the files in place: CA B joins the bundle, the certificate becomes B.
    let (ca_path, _, _) = tls_paths(dir.path(), "coordinator");
    write_tls(dir.path(), "coordinator", &both, &cert_b)?;
    ensure!(std::fs::read_to_string(ca_path)? == both);
    let rotated =
        || async { matches!(https_get(&both, &metrics_url).await, Ok((_, p)) if p == cert_b.der) };
    // A node's certificate watcher runs on its own clock.
    wait_until(
        "the admin API presents certificate B",
        Duration::from_secs(15),
        rotated,
    )
    .await?;
    let (text, _) = https_get(&ca_b.pem, &metrics_url).await?;
    ensure!(expiry(&text) == Some(NOT_AFTER_2031_06_01), "{text}");
    grpc_health(grpc, &ca_b.pem, &client_b)
        .await
        .context("the gRPC port after the rotation (certificate B, CA B trusted)")?;

    task.close().await
}
