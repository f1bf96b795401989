//! Mutual TLS between the nodes. A throwaway CA (rcgen) signs one certificate per node role; a
//! cluster of coordinator, verify node and draft node configured with them answers a request end
//! to end. Both gRPC servers (coordinator and verify node) refuse a peer that has no client
//! certificate, one whose certificate another CA signed, and one that speaks plaintext; a draft
//! node holding a foreign certificate cannot join, and says why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgespec::client::{stream_chat, ChatRequest};
use edgespec::cluster::{ClusterOptions, ClusterTls, LocalCluster};
use edgespec_model::synthetic::{write_tiny_gguf, TinySpec};
use edgespec_proto::tls::{source_chain, TlsSettings};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A CA that signs node certificates into a folder.
struct TestCa {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: PathBuf,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, cert.pem())?;
        Ok(TestCa {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            issuer: Issuer::new(params, key),
            ca_pem,
        })
    }

    /// A node certificate for loopback (DNS `localhost`, IP 127.0.0.1), good for server and
    /// client authentication; returns (cert, key) paths.
    fn node(&self, role: &str) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("edgespec {role}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{}-{role}.pem", self.name));
        let key_path = self.dir.join(format!("{}-{role}.key", self.name));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// `[tls]` of a node holding a certificate from this CA and trusting `trust`.
    fn settings(&self, role: &str, trust: &Path) -> Result<TlsSettings> {
        let (cert, key) = self.node(role)?;
        Ok(TlsSettings::mtls(trust, cert, key))
    }
}

/// A gRPC health check against `addr` over the given client TLS configuration (or plaintext).
async fn health_check(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> Result<()> {
    let endpoint = match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    }
    .connect_timeout(Duration::from_secs(5))
    .timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!(source_chain(&e)))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
    Ok(())
}

/// A tiny model and two CAs (the fleet's and a rogue one) in a temporary folder.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    ca: TestCa,
    rogue: TestCa,
}

fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default())?;
    let ca = TestCa::new(dir.path(), "fleet")?;
    let rogue = TestCa::new(dir.path(), "rogue")?;
    Ok(Fixture {
        _dir: dir,
        model,
        ca,
        rogue,
    })
}

/// A draft node that tries to join the coordinator at `address` for a few seconds with `tls`.
fn joining_draft(model: &Path, address: &str, tls: TlsSettings) -> edgespec_draft_node::Settings {
    let mut ds = edgespec_draft_node::Settings::default();
    ds.model.path = model.to_path_buf();
    ds.http.listen = ([127, 0, 0, 1], 0).into();
    ds.coordinator.address = address.to_string();
    ds.coordinator.timeout = Duration::from_secs(4);
    ds.coordinator.backoff_initial = Duration::from_millis(50);
    ds.tls = tls;
    ds
}

fn pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serves_over_mtls_and_refuses_peers_without_a_valid_certificate() -> Result<()> {
    edgespec_tests::init_logs();
    let Fixture {
        _dir,
        model,
        ca,
        rogue,
    } = fixture()?;

    let mut opts = ClusterOptions::new(model.clone(), model);
    opts.tls = Some(ClusterTls {
        coordinator: ca.settings("coordinator", &ca.ca_pem)?,
        verify: ca.settings("verify", &ca.ca_pem)?,
        draft: ca.settings("draft", &ca.ca_pem)?,
    });
    let cluster = LocalCluster::start(opts).await?;
    let out = stream_chat(
        &reqwest::Client::new(),
        &cluster.openai_base(),
        &ChatRequest {
            prompt: "hello".into(),
            max_tokens: 12,
            ..Default::default()
        },
        |_| {},
    )
    .await?;
    ensure!(
        out.completion_tokens > 0,
        "no tokens generated over mTLS: {out:?}"
    );

    let fleet_ca = Certificate::from_pem(pem(&ca.ca_pem)?);
    let (good_cert, good_key) = ca.node("probe")?;
    let (rogue_cert, rogue_key) = rogue.node("probe")?;
    let servers = [
        ("coordinator", cluster.coordinator_grpc),
        ("verify node", cluster.verify_grpc[0]),
    ];
    for (what, addr) in servers {
        // A client with a certificate from the fleet's CA gets in.
        let good = ClientTlsConfig::new()
            .ca_certificate(fleet_ca.clone())
            .identity(Identity::from_pem(pem(&good_cert)?, pem(&good_key)?));
        health_check(addr, Some(good))
            .await
            .with_context(|| format!("{what}: a client with a valid certificate was refused"))?;

        // No client certificate: refused in the handshake.
        let anonymous = ClientTlsConfig::new().ca_certificate(fleet_ca.clone());
        let err = health_check(addr, Some(anonymous)).await;
        ensure!(
            err.is_err(),
            "{what} accepted a client without a certificate"
        );

        // A certificate from another CA: refused.
        let foreign = ClientTlsConfig::new()
            .ca_certificate(fleet_ca.clone())
            .identity(Identity::from_pem(pem(&rogue_cert)?, pem(&rogue_key)?));
        let err = health_check(addr, Some(foreign)).await;
        ensure!(
            err.is_err(),
            "{what} accepted a client certificate from another CA"
        );

        // Plaintext HTTP/2 to a TLS port: refused.
        let err = health_check(addr, None).await;
        ensure!(err.is_err(), "{what} answered a plaintext client");
    }

    // The client side checks the server too: trusting only the rogue CA, the fleet's servers
    // are refused even with a certificate the server would accept.
    let wrong_trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(&rogue.ca_pem)?))
        .identity(Identity::from_pem(pem(&good_cert)?, pem(&good_key)?));
    let err = health_check(cluster.coordinator_grpc, Some(wrong_trust)).await;
    ensure!(
        err.is_err(),
        "a client trusting another CA accepted the coordinator's certificate"
    );

    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_node_with_a_foreign_certificate_cannot_join() -> Result<()> {
    edgespec_tests::init_logs();
    let Fixture {
        _dir,
        model,
        ca,
        rogue,
    } = fixture()?;

    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.tls = ca.settings("coordinator", &ca.ca_pem)?;
    let coordinator = edgespec_coordinator::App::build(cs).await?;
    let grpc = coordinator.grpc_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(coordinator.run(stop.clone().cancelled_owned()));

    // Signed by another CA, but trusting the fleet's CA (so only the coordinator can object).
    let ds = joining_draft(
        &model,
        &format!("https://{grpc}"),
        rogue.settings("draft", &ca.ca_pem)?,
    );
    let err = match edgespec_draft_node::App::build(ds).await {
        Ok(_) => anyhow::bail!("a draft node with a foreign certificate joined the fleet"),
        Err(e) => e.to_string(),
    };
    ensure!(
        err.to_lowercase().contains("certificate") || err.contains("tls") || err.contains("TLS"),
        "the refusal should say it is about the certificate: {err}"
    );

    // A draft node that asks for plaintext against the TLS coordinator cannot join either.
    let ds = joining_draft(&model, &format!("http://{grpc}"), TlsSettings::plaintext());
    ensure!(
        edgespec_draft_node::App::build(ds).await.is_err(),
        "a plaintext draft node joined a TLS coordinator"
    );

    stop.cancel();
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_reach_the_plaintext_health_port_while_the_verifier_stays_behind_mtls() -> Result<()>
{
    let Fixture {
        _dir, model, ca, ..
    } = fixture()?;
    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model;
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.server.health_listen = "127.0.0.1:0".into();
    vs.tls = ca.settings("verify", &ca.ca_pem)?;
    let app = edgespec_verify_node::App::build(vs).await?;
    let (grpc, health) = (
        app.grpc_addr(),
        app.health_addr().context("health_listen was set")?,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(app.run(stop.clone().cancelled_owned()));

    // What the kubelet does: a plaintext gRPC health check, no certificate.
    health_check(health, None)
        .await
        .context("the health port refused a plaintext probe")?;
    // The Verifier port itself still refuses plaintext.
    ensure!(
        health_check(grpc, None).await.is_err(),
        "the mTLS port answered a plaintext client"
    );
    // The health port serves nothing but health.
    let channel = Endpoint::from_shared(format!("http://{health}"))?
        .connect()
        .await?;
    let err = edgespec_proto::pb::verifier_client::VerifierClient::new(channel)
        .info(edgespec_proto::pb::InfoRequest::default())
        .await
        .err()
        .context("the health port served the Verifier")?;
    ensure!(err.code() == tonic::Code::Unimplemented, "{err:?}");

    stop.cancel();
    task.await??;
    Ok(())
}

#[tokio::test]
async fn a_node_in_mtls_mode_without_certificates_refuses_to_start() -> Result<()> {
    let Fixture { _dir, model, .. } = fixture()?;
    // The shipped default is mTLS: with no files configured every node stops at start-up and
    // names the missing key and the plaintext alternative.
    let cs = edgespec_coordinator::Settings::default();
    let err = edgespec_coordinator::App::build(cs)
        .await
        .err()
        .context("coordinator started without TLS files")?
        .to_string();
    ensure!(err.contains("tls.ca") && err.contains("plaintext"), "{err}");

    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.clone();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    let err = edgespec_verify_node::App::build(vs)
        .await
        .err()
        .context("verify node started without TLS files")?
        .to_string();
    ensure!(err.contains("tls.ca"), "{err}");

    let mut ds = edgespec_draft_node::Settings::default();
    ds.model.path = model;
    ds.http.listen = ([127, 0, 0, 1], 0).into();
    let err = edgespec_draft_node::App::build(ds)
        .await
        .err()
        .context("draft node started without TLS files")?
        .to_string();
    ensure!(err.contains("tls.ca"), "{err}");
    Ok(())
}
