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
use edgespec_runtime::tls::{source_chain, TlsSettings};
use edgespec_testkit::ca::{self, CertSpec};
use edgespec_testkit::harness::Running;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A CA (`edgespec_testkit::ca`) that writes its certificate and the node certificates it
/// signs into a folder.
struct TestCa {
    dir: PathBuf,
    name: String,
    ca: ca::TestCa,
    ca_pem: PathBuf,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> Result<TestCa> {
        let ca = ca::TestCa::new(name)?;
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, &ca.pem)?;
        Ok(TestCa {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca,
            ca_pem,
        })
    }

    /// A node certificate for loopback (DNS `localhost`, IP 127.0.0.1), good for server and
    /// client authentication, naming the node `spiffe://edgespec/<role>/<id>` with the id the
    /// local cluster gives that role (`verify-0`, `draft-0`); returns (cert, key) paths.
    fn node(&self, role: &str) -> Result<(PathBuf, PathBuf)> {
        let id = match role {
            "verify" => "verify-0",
            "draft" => "draft-0",
            other => other,
        };
        self.node_as(role, id, true)
    }

    /// A certificate for node `id` of `role`; `with_identity = false` leaves out the URI SAN
    /// (a certificate from before per-role identities).
    fn node_as(&self, role: &str, id: &str, with_identity: bool) -> Result<(PathBuf, PathBuf)> {
        let cert = self.ca.sign(CertSpec {
            identity: with_identity,
            ..CertSpec::new(role, id)
        })?;
        let cert_path = self
            .dir
            .join(format!("{}-{role}-{id}-{with_identity}.pem", self.name));
        let key_path = self
            .dir
            .join(format!("{}-{role}-{id}-{with_identity}.key", self.name));
        std::fs::write(&cert_path, &cert.cert)?;
        std::fs::write(&key_path, &cert.key)?;
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

    // The admin API is HTTPS with the coordinator's certificate: a client trusting the fleet CA
    // gets in (the cluster itself polled /admin/v1/nodes that way to start), plain HTTP does not.
    let healthz = cluster
        .admin_client()
        .get(cluster.admin_url("/healthz"))
        .send()
        .await
        .context("HTTPS /healthz with the fleet CA")?;
    ensure!(healthz.status().is_success(), "{healthz:?}");
    ensure!(cluster.admin_url("/").starts_with("https://"));
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", cluster.admin_http))
        .send()
        .await;
    ensure!(
        plain.map_or(true, |r| !r.status().is_success()),
        "the admin API answered plain HTTP in mTLS mode"
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
    let coordinator = Running::spawn(|stop| coordinator.run(stop));

    // Signed by another CA, but trusting the fleet's CA (so only the coordinator can object).
    // The draft node starts (it never waits for its coordinator) but never gets a stream, and
    // says why.
    let ds = joining_draft(
        &model,
        &format!("https://{grpc}"),
        rogue.settings("draft", &ca.ca_pem)?,
    );
    let reason = refused_reason(ds).await?;
    ensure!(
        reason.to_lowercase().contains("certificate")
            || reason.contains("tls")
            || reason.contains("TLS"),
        "the refusal should say it is about the certificate: {reason}"
    );

    // A draft node that asks for plaintext against the TLS coordinator cannot join either.
    let ds = joining_draft(&model, &format!("http://{grpc}"), TlsSettings::plaintext());
    refused_reason(ds).await?;

    coordinator.close().await
}

/// Starts a draft node the coordinator must refuse, waits for its first failed attempt and
/// returns why it is not ready (`/readyz`'s reason).
async fn refused_reason(ds: edgespec_draft_node::Settings) -> Result<String> {
    let app = edgespec_draft_node::App::build(ds).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match app.node().ready() {
            Ok(()) => anyhow::bail!("a draft node the coordinator must refuse got a stream"),
            Err(reason) if reason.contains("): ") => return Ok(reason),
            Err(reason) => ensure!(
                tokio::time::Instant::now() < deadline,
                "no connection attempt failed within 10 s: {reason}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let node = Running::spawn(|stop| app.run(stop));

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

    node.close().await
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

/// A gRPC channel to `addr` presenting `cert`/`key` and trusting the fleet CA.
async fn channel_as(
    ca: &TestCa,
    addr: std::net::SocketAddr,
    (cert, key): (PathBuf, PathBuf),
) -> Result<tonic::transport::Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(&ca.ca_pem)?))
        .identity(Identity::from_pem(pem(&cert)?, pem(&key)?));
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Asserts a call was refused for its role, and says which call.
fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> Result<()> {
    match r {
        Err(s) if s.code() == tonic::Code::PermissionDenied => Ok(()),
        other => anyhow::bail!("{what}: expected PERMISSION_DENIED, got {other:?}"),
    }
}

fn verify_request() -> edgespec_proto::pb::VerifyBatchRequest {
    edgespec_proto::pb::VerifyBatchRequest {
        batch_id: 1,
        coordinator_id: "intruder".into(),
        fingerprint: String::new(),
        items: vec![edgespec_proto::pb::VerifyItem {
            session_id: 1,
            round: 1,
            committed_len: 1,
            history: vec![1],
            ..Default::default()
        }],
    }
}

/// Per-role authorization: a certificate from the fleet CA lets a peer do what its role does,
/// and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_call_only_its_own_rpcs() -> Result<()> {
    use edgespec_proto::pb::coordinator_client::CoordinatorClient;
    use edgespec_proto::pb::verifier_client::VerifierClient;
    use edgespec_proto::pb::{
        DraftHello, DraftMessage, InfoRequest, NodeInfo, RegisterVerifierRequest, ReleaseRequest,
        VerifierHeartbeatRequest,
    };
    edgespec_tests::init_logs();
    let Fixture {
        _dir, model, ca, ..
    } = fixture()?;

    let mut cs = edgespec_coordinator::Settings::for_tests();
    cs.tls = ca.settings("coordinator", &ca.ca_pem)?;
    let coordinator = edgespec_coordinator::App::build(cs).await?;
    let cgrpc = coordinator.grpc_addr();
    let coordinator = Running::spawn(|stop| coordinator.run(stop));

    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.clone();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.tls = ca.settings("verify", &ca.ca_pem)?;
    let verify = edgespec_verify_node::App::build(vs).await?;
    // node_id was left empty: the node runs as the id its certificate names.
    ensure!(verify.facts().node_id == "verify-0", "{:?}", verify.facts());
    let vgrpc = verify.grpc_addr();
    let verify = Running::spawn(|stop| verify.run(stop));

    let draft = ca.node("draft")?;
    let verify_b = ca.node_as("verify", "verify-b", true)?;
    let coord = ca.node("coordinator")?;
    let anonymous_role = ca.node_as("verify", "old", false)?;

    // Only coordinators may verify, release or ask a verify node for its facts.
    for (who, cert) in [
        ("a draft node", draft.clone()),
        ("another verify node", verify_b.clone()),
        ("a certificate without a role", anonymous_role.clone()),
    ] {
        let mut v = VerifierClient::new(channel_as(&ca, vgrpc, cert).await?);
        denied(
            &format!("{who} calling Verify"),
            v.verify(verify_request()).await,
        )?;
        denied(
            &format!("{who} calling Release"),
            v.release(ReleaseRequest {
                session_ids: vec![1, 2, 3],
                coordinator_id: "intruder".into(),
            })
            .await,
        )?;
        denied(&format!("{who} calling Info"), v.info(InfoRequest {}).await)?;
    }
    let mut v = VerifierClient::new(channel_as(&ca, vgrpc, coord.clone()).await?);
    let info = v
        .info(InfoRequest {})
        .await
        .context("a coordinator asks for Info")?;
    ensure!(info.get_ref().node_id == "verify-0");
    // The denial says what was needed.
    let mut v = VerifierClient::new(channel_as(&ca, vgrpc, anonymous_role.clone()).await?);
    let msg = v
        .verify(verify_request())
        .await
        .unwrap_err()
        .message()
        .to_string();
    ensure!(
        msg.contains("spiffe://edgespec/") && msg.contains("coordinator"),
        "{msg}"
    );

    // Registration and heartbeats: only verify nodes, each only as itself.
    let register = |node_id: &str| RegisterVerifierRequest {
        info: Some(NodeInfo {
            node_id: node_id.into(),
            advertise_addr: format!("https://{vgrpc}"),
            pool: "onprem".into(),
            ..Default::default()
        }),
    };
    let heartbeat = |node_id: &str| VerifierHeartbeatRequest {
        node_id: node_id.into(),
        load: None,
        draining: true,
    };
    for (who, cert) in [
        ("a draft node", draft.clone()),
        ("a coordinator", coord.clone()),
    ] {
        let mut c = CoordinatorClient::new(channel_as(&ca, cgrpc, cert).await?);
        denied(
            &format!("{who} registering a verify node"),
            c.register_verifier(register("verify-0")).await,
        )?;
        denied(
            &format!("{who} heartbeating for a verify node"),
            c.verifier_heartbeat(heartbeat("verify-0")).await,
        )?;
    }
    let mut c = CoordinatorClient::new(channel_as(&ca, cgrpc, verify_b.clone()).await?);
    denied(
        "verify node B registering as verify-0",
        c.register_verifier(register("verify-0")).await,
    )?;
    denied(
        "verify node B draining verify-0",
        c.verifier_heartbeat(heartbeat("verify-0")).await,
    )?;
    let msg = c
        .register_verifier(register("verify-0"))
        .await
        .unwrap_err()
        .message()
        .to_string();
    ensure!(
        msg.contains("verify-b") && msg.contains("verify-0"),
        "{msg}"
    );
    // As itself, it is not refused for its role (whatever else registration checks).
    if let Err(s) = c.register_verifier(register("verify-b")).await {
        ensure!(s.code() != tonic::Code::PermissionDenied, "{s:?}");
    }

    // The draft stream: only draft nodes, each only under its own id.
    let hello = |node_id: &str| DraftMessage {
        kind: Some(edgespec_proto::pb::draft_message::Kind::Hello(DraftHello {
            node_id: node_id.into(),
            model_name: "draft".into(),
            fingerprint: "0".repeat(64),
            vocab_size: 100,
            ..Default::default()
        })),
    };
    for (who, cert, id) in [
        ("a verify node", verify_b.clone(), "verify-b"),
        ("a coordinator", coord.clone(), "coordinator"),
        ("draft-0 saying hello as draft-9", draft.clone(), "draft-9"),
    ] {
        let mut c = CoordinatorClient::new(channel_as(&ca, cgrpc, cert).await?);
        let first = hello(id);
        denied(
            &format!("{who} opening a Drafts stream"),
            c.drafts(futures::stream::iter(vec![first])).await,
        )?;
    }

    // A node refuses to start with another role's certificate, or under another node's id.
    let mut vs = edgespec_verify_node::Settings::default();
    vs.model.path = model.clone();
    vs.server.listen = ([127, 0, 0, 1], 0).into();
    vs.tls = ca.settings("draft", &ca.ca_pem)?;
    let err = edgespec_verify_node::App::build(vs)
        .await
        .err()
        .context("a verify node started with a draft certificate")?
        .to_string();
    ensure!(err.contains("role draft"), "{err}");
    let mut ds = joining_draft(
        &model,
        &format!("https://{cgrpc}"),
        ca.settings("draft", &ca.ca_pem)?,
    );
    ds.node.id = "draft-9".into();
    let err = edgespec_draft_node::App::build(ds)
        .await
        .err()
        .context("a draft node started under another node's id")?
        .to_string();
    ensure!(err.contains("draft-9") && err.contains("draft-0"), "{err}");

    coordinator.shutdown();
    verify.shutdown();
    coordinator.close().await?;
    verify.close().await
}
