//! Certificates reloaded from disk without a restart: a gRPC server (tonic's health service
//! behind the runtime's TLS termination) starts with certificate A from CA A; the files are
//! rotated to certificate B from CA B (with a later notAfter); new connections are presented
//! B and accept clients of CA B, and the expiry gauge follows, without restarting anything.
//! Files that do not form a usable certificate, or that name another node, are not swapped in.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgespec_proto::auth::{Role, COORDINATOR_RULES};
use edgespec_runtime::ops::Exposition;
use edgespec_runtime::tls::{Tls, TlsSettings};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// notAfter of certificate A and of certificate B (unix seconds of 2030-01-01 and 2031-06-01).
const A_NOT_AFTER: i64 = 1_893_456_000;
const B_NOT_AFTER: i64 = 1_938_038_400;

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) of `spiffe://edgespec/<role>/<id>` for loopback.
    fn node(&self, role: &str, id: &str, not_after: (i32, u8, u8)) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://edgespec/{role}/{id}").try_into().unwrap(),
        ));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("edgespec {role}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The node's three files in a temporary folder.
struct Files {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        let (ca, cert, key) = (path("ca.pem"), path("node.pem"), path("node.key"));
        Files {
            _dir: dir,
            ca,
            cert,
            key,
        }
    }

    fn write(&self, ca: &str, (cert, key): &(String, String)) {
        std::fs::write(&self.ca, ca).unwrap();
        std::fs::write(&self.cert, cert).unwrap();
        std::fs::write(&self.key, key).unwrap();
    }

    fn settings(&self, reload_interval: Duration) -> TlsSettings {
        TlsSettings {
            reload_interval,
            ..TlsSettings::mtls(&self.ca, &self.cert, &self.key)
        }
    }
}

fn der(cert_pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()
}

/// Serves gRPC health with `tls` on loopback until the test ends.
async fn serve(tls: &Tls) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let router = tls.grpc_server(COORDINATOR_RULES).add_service(health);
    let tls = tls.clone();
    tokio::spawn(async move {
        tls.serve_grpc(router, listener, std::future::pending())
            .await
            .unwrap()
    });
    addr
}

/// The certificate the server at `addr` presents to a new connection (the client trusts
/// `trust` and presents `client`).
async fn presented(addr: SocketAddr, trust: &[&str], client: &(String, String)) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in trust {
        roots.add(der(ca)).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![der(&client.0)],
            PrivateKeyDer::from_pem_slice(client.1.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A gRPC health check as a client of `ca` with certificate `client`.
async fn health(addr: SocketAddr, ca: &str, client: &(String, String)) -> Result<(), String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(&client.0, &client.1))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| edgespec_runtime::tls::source_chain(&e))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

fn expiry_line(tls: &Tls) -> String {
    let text = Exposition::new().with(tls.metrics()).encode();
    text.lines()
        .find(|l| l.starts_with("edgespec_tls_cert_expiry_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no expiry gauge in\n{text}"))
        .to_string()
}

/// Polls `check` until it holds (the watcher runs on its own clock), for at most 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, check: impl Fn() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let (ca_a, ca_b) = (Ca::new("A"), Ca::new("B"));
    let cert_a = ca_a.node("coordinator", "c0", (2030, 1, 1));
    let cert_b = ca_b.node("coordinator", "c0", (2031, 6, 1));
    let client_a = ca_a.node("draft", "d0", (2030, 1, 1));
    let client_b = ca_b.node("draft", "d0", (2030, 1, 1));
    let files = Files::new();
    files.write(&ca_a.pem, &cert_a);

    let tls = files
        .settings(Duration::from_millis(50))
        .load(Role::Coordinator)
        .unwrap();
    let _watch = tls.watch();
    let addr = serve(&tls).await;
    let both = [ca_a.pem.as_str(), ca_b.pem.as_str()];

    assert_eq!(
        presented(addr, &both, &client_a).await,
        der(&cert_a.0).to_vec()
    );
    health(addr, &ca_a.pem, &client_a).await.unwrap();
    assert!(
        health(addr, &ca_b.pem, &client_b).await.is_err(),
        "a client of CA B got in before the rotation"
    );
    assert_eq!(
        expiry_line(&tls),
        format!("edgespec_tls_cert_expiry_timestamp_seconds {A_NOT_AFTER}")
    );

    // Rotation: the CA bundle gains CA B, the node's certificate is now B's.
    files.write(&format!("{}{}", ca_a.pem, ca_b.pem), &cert_b);
    eventually("the server presents certificate B", || async {
        presented(addr, &both, &client_a).await == der(&cert_b.0).to_vec()
    })
    .await;
    health(addr, &ca_b.pem, &client_b)
        .await
        .expect("a client of CA B is accepted after the rotation");
    health(addr, &ca_b.pem, &client_a)
        .await
        .expect("clients of CA A are still accepted (CA A is still in the bundle)");
    assert!(
        health(addr, &ca_a.pem, &client_a).await.is_err(),
        "a client trusting only CA A accepted certificate B"
    );
    assert_eq!(
        expiry_line(&tls),
        format!("edgespec_tls_cert_expiry_timestamp_seconds {B_NOT_AFTER}")
    );
    // Dials made from now on present B as well.
    let endpoint = tls.endpoint(&format!("https://{addr}")).unwrap();
    let channel = endpoint
        .connect()
        .await
        .expect("dialling with the new material");
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("the node's own client configuration follows the rotation");
}

#[tokio::test]
async fn unusable_or_foreign_files_leave_the_loaded_certificate_in_place() {
    let ca = Ca::new("A");
    let cert = ca.node("verify", "v0", (2030, 1, 1));
    let files = Files::new();
    files.write(&ca.pem, &cert);
    // No watcher: reload() is what each of its ticks does.
    let tls = files.settings(Duration::ZERO).load(Role::Verify).unwrap();
    assert!(
        !tls.reload().unwrap(),
        "unchanged files are not a new certificate"
    );
    let before = expiry_line(&tls);
    assert_eq!(tls.version(), 0);

    // A certificate for another node id: refused, the node keeps its identity.
    files.write(&ca.pem, &ca.node("verify", "v9", (2031, 6, 1)));
    let err = tls.reload().unwrap_err().to_string();
    assert!(err.contains("v9") && err.contains("v0"), "{err}");
    assert_eq!(expiry_line(&tls), before);

    // The key of another certificate (a rotation caught half-written): refused.
    let other = ca.node("verify", "v0", (2031, 6, 1));
    files.write(&ca.pem, &(other.0.clone(), cert.1.clone()));
    assert!(
        tls.reload().is_err(),
        "a certificate with the wrong key was swapped in"
    );
    assert_eq!(expiry_line(&tls), before);
    assert_eq!(tls.version(), 0, "refused files are no new generation");

    // The right pair: taken, as a new generation (long-lived clients dial afresh on it).
    files.write(&ca.pem, &other);
    assert!(tls.reload().unwrap());
    assert_eq!(tls.version(), 1);
    assert_eq!(
        expiry_line(&tls),
        format!("edgespec_tls_cert_expiry_timestamp_seconds {B_NOT_AFTER}")
    );
    assert_eq!(tls.own_identity().unwrap().node_id, "v0");
}

#[test]
fn plaintext_has_no_expiry_gauge() {
    let text = Exposition::new().with(Tls::plaintext().metrics()).encode();
    assert!(!text.contains("edgespec_tls"), "{text}");
}
