//! A throwaway certificate authority (rcgen) for the mTLS tests: node certificates the way the
//! fleet's CA issues them (loopback names, server and client authentication, the node's identity
//! as the URI SAN `spiffe://edgespec/<role>/<id>`).

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A CA: its certificate and the key that signs node certificates.
pub struct TestCa {
    /// The CA certificate, PEM.
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A signed node certificate.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// Certificate, PEM.
    pub cert: String,
    /// Private key, PEM.
    pub key: String,
    /// Certificate, DER (what a server presents).
    pub der: Vec<u8>,
}

/// What a node certificate says.
#[derive(Debug, Clone, Copy)]
pub struct CertSpec<'a> {
    /// Role in the identity and the common name.
    pub role: &'a str,
    /// Node id in the identity.
    pub id: &'a str,
    /// Carry the URI SAN identity (false: a certificate from before per-role identities).
    pub identity: bool,
    /// Expiry date `(year, month, day)`; `None`: rcgen's default.
    pub not_after: Option<(i32, u8, u8)>,
}

impl<'a> CertSpec<'a> {
    /// Node `id` of `role`, with its identity and the default expiry.
    pub fn new(role: &'a str, id: &'a str) -> Self {
        Self {
            role,
            id,
            identity: true,
            not_after: None,
        }
    }
}

impl TestCa {
    /// A new self-signed CA called "`name` test CA".
    pub fn new(name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self {
            pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// A certificate for loopback (DNS `localhost`, IP 127.0.0.1), good for server and client
    /// authentication.
    pub fn sign(&self, spec: CertSpec<'_>) -> Result<NodeCert> {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        if spec.identity {
            params.subject_alt_names.push(SanType::URI(
                format!("spiffe://edgespec/{}/{}", spec.role, spec.id).try_into()?,
            ));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, format!("edgespec {}", spec.role));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if let Some((y, m, d)) = spec.not_after {
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}
