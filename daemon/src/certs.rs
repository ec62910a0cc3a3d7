//! `ballast ca init` and `ballast cert issue`: the cluster CA, node certificates for mutual
//! TLS between nodes, and client certificates for NBD over TCP (see `replication::tls`).
//!
//! Keys are written 0600 and never replaced: a CA key that exists is kept (replacing it would
//! orphan every certificate it signed), and a node key is replaced only with its certificate.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The CA certificate's file name in the CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name in the CA directory.
pub const CA_KEY: &str = "ca-key.pem";

fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Write `text` to `path` with `mode`, replacing it only if `replace`.
fn write(path: &Path, text: &str, mode: u32, replace: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if replace {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// `ballast ca init --dir DIR`: the paths written.
///
/// # Errors
/// A CA key exists there already, or a file cannot be written.
pub fn ca_init(dir: &Path) -> Result<[PathBuf; 2]> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if key_path.exists() {
        bail!(
            "{} exists: a cluster CA is there already (replacing its key would invalidate every \
             node certificate it signed); use another --dir, or remove it on purpose",
            key_path.display()
        );
    }
    private_dir(dir)?;
    let (cert, key) = replication::tls::issue_ca()?;
    write(&key_path, &key, 0o600, false)?;
    write(&cert_path, &cert, 0o644, true)?;
    Ok([cert_path, key_path])
}

fn read_ca(ca_dir: &Path, file: &str) -> Result<String> {
    let path = ca_dir.join(file);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (make a CA with `ballast ca init --dir {}`)",
            path.display(),
            ca_dir.display()
        )
    })
}

/// `ballast cert issue --node NAME [--address A]... --ca-dir CA --out-dir OUT --days DAYS`:
/// the paths written.
///
/// # Errors
/// The CA key cannot be read or used, NAME or an address is not a valid DNS name (or IP
/// address), or a file cannot be written.
pub fn cert_issue(
    node: &str,
    addresses: &[String],
    ca_dir: &Path,
    out_dir: &Path,
    days: u32,
) -> Result<[PathBuf; 2]> {
    let ca_key = read_ca(ca_dir, CA_KEY)?;
    let (cert, key) = replication::tls::issue_node(&ca_key, node, addresses, days)?;
    private_dir(out_dir)?;
    let cert_path = out_dir.join(format!("{node}.pem"));
    let key_path = out_dir.join(format!("{node}-key.pem"));
    // The key first: a certificate never sits next to a key it does not match for longer
    // than the two writes.
    write(&key_path, &key, 0o600, true)?;
    write(&cert_path, &cert, 0o644, true)?;
    Ok([cert_path, key_path])
}

/// The file names of an NBD client's TLS directory, as qemu's `tls-creds-x509` (`dir=`) and
/// libnbd's `tls-certificates` read them: the CA, the client certificate, its key.
pub const CLIENT_FILES: [&str; 3] = ["ca-cert.pem", "client-cert.pem", "client-key.pem"];

/// `ballast cert issue --client NAME --ca-dir CA --out-dir OUT --days DAYS`: a client
/// certificate for NBD over TCP, written with the CA's certificate as [`CLIENT_FILES`] in OUT.
/// The paths written.
///
/// # Errors
/// The CA's files cannot be read or used, NAME is unusable, or a file cannot be written.
pub fn client_issue(name: &str, ca_dir: &Path, out_dir: &Path, days: u32) -> Result<[PathBuf; 3]> {
    let ca_key = read_ca(ca_dir, CA_KEY)?;
    let ca_cert = read_ca(ca_dir, CA_CERT)?;
    let (cert, key) = replication::tls::issue_client(&ca_key, name, days)?;
    private_dir(out_dir)?;
    let [ca_path, cert_path, key_path] = CLIENT_FILES.map(|f| out_dir.join(f));
    write(&key_path, &key, 0o600, true)?;
    write(&cert_path, &cert, 0o644, true)?;
    write(&ca_path, &ca_cert, 0o644, true)?;
    Ok([ca_path, cert_path, key_path])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_never_replaced_and_signs_node_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let [cert, key] = ca_init(&ca).unwrap();
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&ca), 0o700);
        let before = std::fs::read(&key).unwrap();
        let e = ca_init(&ca).unwrap_err().to_string();
        assert!(e.contains("exists"), "{e}");
        assert_eq!(std::fs::read(&key).unwrap(), before, "the CA key is kept");

        let out = dir.path().join("node-a");
        let [node_cert, node_key] = cert_issue("node-a", &[], &ca, &out, 10).unwrap();
        assert_eq!(mode(&node_key), 0o600);
        let tls = replication::tls::Tls::load(replication::tls::TlsFiles {
            ca: cert.clone(),
            cert: node_cert,
            key: node_key,
        });
        assert!(tls.is_ok(), "{tls:?}");

        let e = cert_issue("bad name!", &[], &ca, &out, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid DNS name"), "{e}");
        let e = cert_issue("node-b", &[], &dir.path().join("none"), &out, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ballast ca init"), "{e}");

        let client = dir.path().join("backup");
        let files = client_issue("backup", &ca, &client, 10).unwrap();
        assert_eq!(mode(&files[2]), 0o600);
        assert_eq!(
            std::fs::read(&files[0]).unwrap(),
            std::fs::read(&cert).unwrap()
        );
        let e = client_issue("backup", &dir.path().join("none"), &client, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ballast ca init"), "{e}");
    }
}
