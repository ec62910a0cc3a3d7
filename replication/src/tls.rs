//! Mutual TLS on the replica protocol (issue 14).
//!
//! Every node has a key and a certificate whose subject alternative name is its node name,
//! signed by the cluster's CA ([`issue_ca`], [`issue_node`]: `ballast ca init`, `ballast cert
//! issue --node NAME`). NBD clients over TCP get client-only certificates that name no node
//! ([`issue_client`]: `ballast cert issue --client NAME`). A connection between nodes is TLS 1.3 (or 1.2) with a certificate on
//! both sides, each checked against the CA:
//!
//! - the client checks that the server's certificate names the node it meant to reach;
//! - the server requires a client certificate from the CA, and before it serves anything the
//!   client's `Hello` must name a node of the cluster (asked of [`Members`]) that the
//!   certificate is valid for. The connection is then that node's, whatever later frames say;
//! - what a node may ask is checked against the store too ([`Members`]): `Register` only for
//!   the node and epoch recorded as the volume's attachment (reads and writes are admitted only
//!   on the connection that registered the current epoch, see `crate::fence`), `Delete` only of
//!   a replica the store no longer places here, `Create`, `Resize` (but a dry run), `Clone`,
//!   `DeleteSnapshot` and `TakeSnapshot` only as the store's fresh intent by that node says
//!   ([`Change`]).
//!
//! The files are read again when they change (their size or modification time, checked at
//! most once a second on a new connection): certificates rotate with no restart. A rotation
//! that does not parse keeps the previous ones and logs an error.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of a node's TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), its SAN this node's name.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM object of the kind wanted.
    #[error("{path} holds no {what} in PEM form (make one with `ballast ca init` and `ballast cert issue --node NAME`)")]
    Pem {
        /// What was looked for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the material.
    #[error("invalid TLS material: {0}")]
    Rustls(String),
    /// Making a certificate failed.
    #[error("cannot make a certificate: {0}")]
    Issue(String),
}

/// A boxed future of a yes-or-no answer.
pub type Answer<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// What the store says peers may do: who may connect, and what a node may ask of this one.
/// A store that cannot be asked answers no.
pub trait Members: Send + Sync + fmt::Debug {
    /// Whether `name` is a node of the cluster.
    fn is_node<'a>(&'a self, name: &'a str) -> Answer<'a>;

    /// Whether node `peer` may register `epoch` for `volume` here: the store records that
    /// node and epoch as the volume's current attachment.
    fn may_register<'a>(&'a self, peer: &'a str, volume: &'a str, epoch: u64) -> Answer<'a>;

    /// Whether this node's replica of `volume` may be deleted: the store no longer places
    /// one here (the volume is deleted, or its replica here was replaced).
    fn may_delete<'a>(&'a self, volume: &'a str) -> Answer<'a>;

    /// Whether node `peer` may make `change` to a replica of `volume` of `size` bytes here:
    /// the store holds that node's recent intent to do exactly that.
    fn may_change<'a>(
        &'a self,
        peer: &'a str,
        volume: &'a str,
        change: Change,
        size: u64,
    ) -> Answer<'a>;
}

/// A change a node asks of a peer's replica, which it records as an intent in the store
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Create the replica.
    Create,
    /// Grow the replica.
    Resize,
    /// Create a volume from a snapshot held here (`size` bytes; 0: the snapshot's size).
    Clone,
    /// Delete this node's copy of a snapshot (the size is 0).
    DeleteSnapshot,
    /// Take a snapshot of a volume attached on this node, under its write barrier (the size
    /// is 0).
    TakeSnapshot,
}

impl Change {
    /// Whether the change is about a snapshot (named by the request) rather than a volume.
    pub fn about_snapshot(self) -> bool {
        matches!(self, Change::DeleteSnapshot | Change::TakeSnapshot)
    }
}

/// A node's TLS identity and trust, reloaded when its files change.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    state: Mutex<Loaded>,
}

struct Loaded {
    stamps: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("stamps", &self.stamps)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The size and modification time of each file of `files`: what a change is noticed by.
fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca, &files.cert, &files.key]
        .iter()
        .map(|p| stamp(p))
        .collect()
}

/// The CA certificates in `ca`, as trust roots.
fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("CA certificate", ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Rustls(format!("{}: {e}", ca.display())))?;
    }
    Ok(Arc::new(roots))
}

/// The certificate chain in `cert` and the private key in `key`.
fn identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = certs("certificate", cert)?;
    let pem = read("private key", key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Pem {
        what: "private key",
        path: key.to_owned(),
    })?;
    Ok((chain, key))
}

#[allow(clippy::needless_pass_by_value)] // the shape `map_err` takes
fn rustls_err(e: rustls::Error) -> TlsError {
    TlsError::Rustls(e.to_string())
}

/// A client configuration trusting `roots`, presenting `identity` if given.
fn client_with(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(rustls_err),
    }
}

impl Loaded {
    fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let stamps = stamps(files);
        let roots = roots(&files.ca)?;
        let (chain, key) = identity(&files.cert, &files.key)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rustls_err)?;
        let client = client_with(roots, Some((chain, key)))?;
        Ok(Self {
            stamps,
            checked: Instant::now(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// A client configuration trusting the CA certificates in `ca`, presenting the certificate
/// and key in `identity` if given (for a TLS service such as etcd; names are checked as
/// usual).
///
/// # Errors
/// A file cannot be read or parsed, or the key does not match the certificate.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let identity = identity.map(|(c, k)| self::identity(c, k)).transpose()?;
    client_with(roots(ca)?, identity)
}

/// A TLS stream of either side.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;
/// A TLS stream of the connecting side.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

impl Tls {
    /// Load `files`.
    ///
    /// # Errors
    /// A file cannot be read or parsed, or the key does not match the certificate.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let loaded = Loaded::load(&files)?;
        Ok(Arc::new(Self {
            files,
            state: Mutex::new(loaded),
        }))
    }

    /// The current configurations, read again first if a file changed.
    fn configs(&self) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.checked.elapsed() >= Duration::from_secs(1) {
            s.checked = Instant::now();
            let now = stamps(&self.files);
            if now != s.stamps {
                match Loaded::load(&self.files) {
                    Ok(fresh) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS files changed; using the new ones");
                        *s = fresh;
                    }
                    Err(e) => {
                        // Keep serving with the previous ones; try again once they change.
                        s.stamps = now;
                        tracing::error!(error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                    }
                }
            }
        }
        (Arc::clone(&s.server), Arc::clone(&s.client))
    }

    /// The server side of a handshake on `tcp`.
    ///
    /// # Errors
    /// The handshake fails (no client certificate, one not from the CA, …) or times out.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<ServerStream> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.configs().0);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }

    /// The client side of a handshake with node `peer` on `tcp`: its certificate must name
    /// `peer`.
    ///
    /// # Errors
    /// `peer` is not a valid DNS name, or the handshake fails.
    pub async fn connect(&self, peer: &str, tcp: TcpStream) -> io::Result<ClientStream> {
        let name = ServerName::try_from(peer.to_owned()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("node name {peer:?} cannot be checked against a certificate"),
            )
        })?;
        let connector = tokio_rustls::TlsConnector::from(self.configs().1);
        connector.connect(name, tcp).await
    }
}

/// Whether the verified client certificate `cert` names node `name`.
pub fn certifies(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(end) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    end.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The CA's subject. A node certificate is signed by a CA certificate rebuilt from these
/// parameters and the CA's key: the same subject and key identifier as the one `ca init`
/// wrote, so chains verify against it.
const CA_NAME: &str = "ballast cluster CA";

fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

/// A new CA: its certificate and key, both PEM.
///
/// # Errors
/// Key generation or signing fails.
pub fn issue_ca() -> Result<(String, String), TlsError> {
    let issue = |e: rcgen::Error| TlsError::Issue(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(issue)?;
    let cert = ca_params().self_signed(&key).map_err(issue)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate and key for node `node`, signed by the CA whose key is `ca_key` (PEM, as
/// [`issue_ca`] made it); valid from yesterday for `days` days. Its SANs are the node name
/// and `addresses` (IP addresses or DNS names a client may dial, e.g. for NBD over TCP), and
/// it serves both as a server and as a client certificate.
///
/// # Errors
/// The CA key does not parse, `node` or an address is not a valid DNS name or IP address, or
/// signing fails.
pub fn issue_node(
    ca_key: &str,
    node: &str,
    addresses: &[String],
    days: u32,
) -> Result<(String, String), TlsError> {
    if ServerName::try_from(node).is_err() {
        return Err(TlsError::Issue(format!(
            "node name {node:?} is not a valid DNS name, so no certificate can name it"
        )));
    }
    let mut sans = vec![rcgen::SanType::DnsName(dns_name(node)?)];
    for a in addresses {
        sans.push(match a.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) if ServerName::try_from(a.as_str()).is_ok() => {
                rcgen::SanType::DnsName(dns_name(a)?)
            }
            Err(_) => {
                return Err(TlsError::Issue(format!(
                    "address {a:?} is neither an IP address nor a DNS name"
                )))
            }
        });
    }
    issue_leaf(
        ca_key,
        node,
        sans,
        vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
        days,
    )
}

/// A client certificate and key for `name` (an NBD client over TCP), signed by the CA whose
/// key is `ca_key`; valid from yesterday for `days` days. `name` is only its common name: it
/// has no subject alternative name, so it can never pass for a node ([`certifies`] is false
/// for every name) and it is good for client authentication only.
///
/// # Errors
/// `name` is empty, the CA key does not parse, or signing fails.
pub fn issue_client(ca_key: &str, name: &str, days: u32) -> Result<(String, String), TlsError> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(TlsError::Issue(format!(
            "client name {name:?} must be 1 to 64 printable characters"
        )));
    }
    issue_leaf(
        ca_key,
        name,
        Vec::new(),
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        days,
    )
}

fn dns_name(name: &str) -> Result<rcgen::Ia5String, TlsError> {
    rcgen::Ia5String::try_from(name).map_err(|e| TlsError::Issue(e.to_string()))
}

/// A certificate signed by the CA of `ca_key`, with common name `cn`, these SANs and uses.
fn issue_leaf(
    ca_key: &str,
    cn: &str,
    sans: Vec<rcgen::SanType>,
    uses: Vec<rcgen::ExtendedKeyUsagePurpose>,
    days: u32,
) -> Result<(String, String), TlsError> {
    let issue = |e: rcgen::Error| TlsError::Issue(e.to_string());
    let ca_key = rcgen::KeyPair::from_pem(ca_key).map_err(issue)?;
    let ca = ca_params().self_signed(&ca_key).map_err(issue)?;
    let key = rcgen::KeyPair::generate().map_err(issue)?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = uses;
    let today = days_since_epoch();
    let (y, m, d) = ymd(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(today + i64::from(days));
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(issue)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn days_since_epoch() -> i64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2)
}

/// The calendar date `days` after 1970-01-01, as rcgen takes it.
fn ymd(days: i64) -> (i32, u8, u8) {
    let (y, m, d) = api::civil_date(days);
    (i32::try_from(y).unwrap_or(i32::MAX), m as u8, d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_dates() {
        assert_eq!(ymd(0), (1970, 1, 1));
        assert_eq!(ymd(59), (1970, 3, 1));
        assert_eq!(ymd(11_016), (2000, 2, 29));
        assert_eq!(ymd(20_790), (2026, 12, 3));
    }

    #[test]
    fn a_node_certificate_names_its_node_only() {
        let (_ca, ca_key) = issue_ca().unwrap();
        let (cert, _key) = issue_node(&ca_key, "node-a", &[], 30).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert!(certifies(&der, "node-a"));
        assert!(!certifies(&der, "node-b"));
        assert!(issue_node(&ca_key, "not a name", &[], 30).is_err());
        assert!(issue_node("garbage", "node-a", &[], 30).is_err());
        let extra = ["10.0.0.5".to_owned(), "node-a.example".to_owned()];
        let (cert, _key) = issue_node(&ca_key, "node-a", &extra, 30).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert!(certifies(&der, "node-a") && certifies(&der, "node-a.example"));
        assert!(issue_node(&ca_key, "node-a", &["bad name!".to_owned()], 30).is_err());
    }

    #[test]
    fn a_client_certificate_names_no_node() {
        let (_ca, ca_key) = issue_ca().unwrap();
        let (cert, _key) = issue_client(&ca_key, "backup-job", 30).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert!(!certifies(&der, "backup-job"));
        assert!(!certifies(&der, "node-a"));
        assert!(issue_client(&ca_key, "", 30).is_err());
    }
}
