//! Per-role authorization of gRPC calls between nodes.
//!
//! mTLS says that a peer holds a certificate from the fleet's CA; it does not say what the peer
//! may do. Every node certificate therefore names its role and node id in a URI SAN,
//! `spiffe://<trust-domain>/<role>/<node-id>` ([`PeerIdentity`]), and every gRPC server runs one
//! tower layer ([`AuthorizeLayer`]) that looks up the called method in a fixed table of rules
//! and refuses, with `PERMISSION_DENIED`, a caller whose role the rule does not name. Anything
//! not in the table is refused (default deny). The layer stores the caller's identity in the
//! request's extensions, so handlers can check the ids a message claims against it
//! ([`check_node_id`]) and scope state by it ([`caller`]).
//!
//! In plaintext mode there are no certificates and the layer lets everything through: plaintext
//! is for one machine or a trusted lab network only.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// What a node is in the fleet; the second path segment of its SPIFFE id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Draft node: opens one `Drafts` stream to a coordinator.
    Draft,
    /// Verify node: registers and heartbeats with coordinators as itself.
    Verify,
    /// Coordinator: calls verify nodes.
    Coordinator,
}

impl Role {
    /// The path segment, e.g. `verify`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Draft => "draft",
            Role::Verify => "verify",
            Role::Coordinator => "coordinator",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        match s {
            "draft" => Some(Role::Draft),
            "verify" => Some(Role::Verify),
            "coordinator" => Some(Role::Coordinator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity a node certificate names: `spiffe://<trust_domain>/<role>/<node_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// The node's role.
    pub role: Role,
    /// The node's id (the ids in its messages must equal it).
    pub node_id: String,
    /// The whole URI, for logs and errors.
    pub uri: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Why a certificate names no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER does not parse as an X.509 certificate.
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    /// No URI SAN of the form this fleet uses.
    #[error(
        "the certificate has no URI SAN `spiffe://{trust_domain}/<role>/<node-id>` (role: draft, \
         verify or coordinator){found}"
    )]
    Missing {
        /// The expected trust domain.
        trust_domain: String,
        /// The URI SANs it does have, if any, as `; it has …`.
        found: String,
    },
}

/// Largest node id accepted in a certificate or message (ids travel in metrics labels and logs).
pub const MAX_NODE_ID_LEN: usize = 128;

/// Parses one SPIFFE URI of `trust_domain` into an identity; `None` if it is not one.
pub fn parse_spiffe(uri: &str, trust_domain: &str) -> Option<PeerIdentity> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (domain, path) = rest.split_once('/')?;
    if domain != trust_domain {
        return None;
    }
    let (role, node_id) = path.split_once('/')?;
    let role = Role::parse(role)?;
    let valid_id = !node_id.is_empty()
        && node_id.len() <= MAX_NODE_ID_LEN
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    valid_id.then(|| PeerIdentity {
        role,
        node_id: node_id.to_string(),
        uri: uri.to_string(),
    })
}

/// The identity named by a DER certificate's URI SANs.
pub fn identity_from_der(der: &[u8], trust_domain: &str) -> Result<PeerIdentity, IdentityError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let mut found = uris.iter().filter_map(|u| parse_spiffe(u, trust_domain));
    match (found.next(), found.next()) {
        (Some(id), None) => Ok(id),
        // Two identities in one certificate would make "who is calling" ambiguous.
        (Some(_), Some(_)) => Err(IdentityError::Missing {
            trust_domain: trust_domain.to_string(),
            found: format!("; it names more than one: {}", uris.join(", ")),
        }),
        _ => Err(IdentityError::Missing {
            trust_domain: trust_domain.to_string(),
            found: if uris.is_empty() {
                String::new()
            } else {
                format!("; it has {}", uris.join(", "))
            },
        }),
    }
}

/// Who may call a method (or every method of a service, when `path` ends in `/`).
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// `/package.Service/Method`, or `/package.Service/` for the whole service.
    pub path: &'static str,
    /// Roles allowed; empty means any certificate of the fleet, with or without an identity.
    pub roles: &'static [Role],
}

const ANY_PEER: &[Role] = &[];
const HEALTH_AND_REFLECTION: [Rule; 3] = [
    Rule {
        path: "/grpc.health.v1.Health/",
        roles: ANY_PEER,
    },
    Rule {
        path: "/grpc.reflection.v1.ServerReflection/",
        roles: ANY_PEER,
    },
    Rule {
        path: "/grpc.reflection.v1alpha.ServerReflection/",
        roles: ANY_PEER,
    },
];

/// The coordinator's gRPC server: draft nodes stream, verify nodes register and heartbeat.
pub const COORDINATOR_RULES: &[Rule] = &[
    Rule {
        path: "/edgespec.v1.Coordinator/Drafts",
        roles: &[Role::Draft],
    },
    Rule {
        path: "/edgespec.v1.Coordinator/RegisterVerifier",
        roles: &[Role::Verify],
    },
    Rule {
        path: "/edgespec.v1.Coordinator/VerifierHeartbeat",
        roles: &[Role::Verify],
    },
    HEALTH_AND_REFLECTION[0],
    HEALTH_AND_REFLECTION[1],
    HEALTH_AND_REFLECTION[2],
];

/// A verify node's gRPC server: only coordinators verify, release and ask for facts.
pub const VERIFIER_RULES: &[Rule] = &[
    Rule {
        path: "/edgespec.v1.Verifier/",
        roles: &[Role::Coordinator],
    },
    HEALTH_AND_REFLECTION[0],
    HEALTH_AND_REFLECTION[1],
    HEALTH_AND_REFLECTION[2],
];

fn rule_for(rules: &[Rule], path: &str) -> Option<Rule> {
    rules.iter().copied().find(|r| {
        if r.path.ends_with('/') {
            path.starts_with(r.path)
        } else {
            path == r.path
        }
    })
}

/// What the layer decided for one call.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Let the call through; the identity, when the certificate names one, goes along.
    Allow(Option<PeerIdentity>),
    /// Refuse with this `PERMISSION_DENIED` message.
    Deny(String),
}

/// The rule check on its own: `cert` is the caller's end-entity certificate (DER).
pub fn decide(rules: &[Rule], trust_domain: &str, path: &str, cert: Option<&[u8]>) -> Decision {
    let Some(rule) = rule_for(rules, path) else {
        return Decision::Deny(format!("{path} is not served to any peer"));
    };
    let identity = cert.map(|c| identity_from_der(c, trust_domain));
    if rule.roles.is_empty() {
        return Decision::Allow(identity.and_then(Result::ok));
    }
    let needed = rule
        .roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    match identity {
        None => Decision::Deny(format!(
            "{path} needs a client certificate of role {needed}"
        )),
        Some(Err(e)) => Decision::Deny(format!("{path} needs role {needed}: {e}")),
        Some(Ok(id)) if rule.roles.contains(&id.role) => Decision::Allow(Some(id)),
        Some(Ok(id)) => Decision::Deny(format!(
            "{path} is for role {needed}; the caller's certificate is {id} (role {})",
            id.role
        )),
    }
}

/// The authorization layer of a gRPC server (see the module docs). Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    inner: Option<Arc<Policy>>,
}

#[derive(Debug)]
struct Policy {
    rules: &'static [Rule],
    trust_domain: String,
}

impl AuthorizeLayer {
    /// Enforces `rules` when `enabled` (mTLS); lets everything through otherwise (plaintext).
    pub fn new(enabled: bool, trust_domain: &str, rules: &'static [Rule]) -> Self {
        AuthorizeLayer {
            inner: enabled.then(|| {
                Arc::new(Policy {
                    rules,
                    trust_domain: trust_domain.to_string(),
                })
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            policy: self.inner.clone(),
            inner,
        }
    }
}

/// The service [`AuthorizeLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct Authorize<S> {
    policy: Option<Arc<Policy>>,
    inner: S,
}

type BoxFuture<T, E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(policy) = &self.policy else {
            return Box::pin(self.inner.call(req));
        };
        let certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        let cert = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        match decide(policy.rules, &policy.trust_domain, req.uri().path(), cert) {
            Decision::Allow(identity) => {
                if let Some(id) = identity {
                    req.extensions_mut().insert(Caller(Arc::new(id)));
                }
                Box::pin(self.inner.call(req))
            }
            Decision::Deny(message) => {
                tracing::warn!(path = %req.uri().path(), %message, "call refused");
                let response = Status::permission_denied(message).into_http::<Body>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The authenticated caller, as the layer stores it in a request's extensions.
#[derive(Debug, Clone)]
struct Caller(Arc<PeerIdentity>);

/// The caller's identity, when the server runs mTLS and its certificate names one.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<Arc<PeerIdentity>> {
    request.extensions().get::<Caller>().map(|c| c.0.clone())
}

/// Refuses a message that claims a node id other than the one in the caller's certificate (a
/// verify node registering as another one, a draft node saying hello as another). Without an
/// identity (plaintext) every claim passes.
pub fn check_node_id<T>(request: &tonic::Request<T>, claimed: &str) -> Result<(), Status> {
    check_claim(caller(request).as_deref(), claimed)
}

/// [`check_node_id`] on an identity taken from a request earlier.
pub fn check_claim(caller: Option<&PeerIdentity>, claimed: &str) -> Result<(), Status> {
    match caller {
        Some(id) if id.node_id != claimed => Err(Status::permission_denied(format!(
            "the caller's certificate is for node `{}`, the request claims node `{claimed}`",
            id.node_id
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_only_in_their_trust_domain() {
        let id = parse_spiffe("spiffe://edgespec/verify/gpu-0", "edgespec").unwrap();
        assert_eq!(id.role, Role::Verify);
        assert_eq!(id.node_id, "gpu-0");
        assert!(parse_spiffe("spiffe://other/verify/gpu-0", "edgespec").is_none());
        assert!(parse_spiffe("spiffe://edgespec/admin/x", "edgespec").is_none());
        assert!(parse_spiffe("spiffe://edgespec/verify/", "edgespec").is_none());
        assert!(parse_spiffe("spiffe://edgespec/verify/a/b", "edgespec").is_none());
        assert!(parse_spiffe("https://edgespec/verify/a", "edgespec").is_none());
    }

    #[test]
    fn rules_deny_by_default_and_name_the_role_needed() {
        let d = decide(
            VERIFIER_RULES,
            "edgespec",
            "/edgespec.v1.Verifier/Verify",
            None,
        );
        assert!(matches!(d, Decision::Deny(m) if m.contains("coordinator")));
        let d = decide(COORDINATOR_RULES, "edgespec", "/edgespec.v1.Other/X", None);
        assert!(matches!(d, Decision::Deny(_)));
        let d = decide(
            COORDINATOR_RULES,
            "edgespec",
            "/grpc.health.v1.Health/Check",
            None,
        );
        assert_eq!(d, Decision::Allow(None));
        // A whole-service rule does not match a longer service name.
        assert!(rule_for(VERIFIER_RULES, "/edgespec.v1.VerifierX/Verify").is_none());
    }
}
