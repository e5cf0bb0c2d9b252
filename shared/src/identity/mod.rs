//! The mesh certificate authority and SPIFFE identities.
//!
//! `ca init` writes `ca.pem`, `ca.key` and `trust-domain` into a state directory; `ca issue`
//! signs a node certificate whose only SAN is the URI `spiffe://<trust-domain>/node/<name>`,
//! usable both as a TLS client and server certificate. Keys are written with mode 0600.

pub mod sessions;
pub mod tls;

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

/// Default lifetime of node certificates issued by `ca issue` (nodes joined to the control
/// plane renew theirs; static deployments pass `--days`).
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: already holds a CA; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0:?} is not a valid name (DNS labels of a-z, 0-9, '-', at most 63 characters each, joined by '.')")]
    BadName(String),
}

/// A SPIFFE identity read from a verified certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    /// The path after the trust domain, such as `node/node-a`.
    pub path: String,
}

impl SpiffeId {
    pub fn node(trust_domain: &str, name: &str) -> Self {
        Self { trust_domain: trust_domain.into(), path: format!("node/{name}") }
    }

    /// Parses `spiffe://td/path`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        if td.is_empty() || path.is_empty() {
            return None;
        }
        Some(Self { trust_domain: td.into(), path: path.into() })
    }

    /// The node name when this is a node identity.
    pub fn node_name(&self) -> Option<&str> {
        self.path.strip_prefix("node/")
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/{}", self.trust_domain, self.path)
    }
}

/// The validity window of a DER certificate, as Unix seconds (not before, not after).
pub fn validity(cert: &[u8]) -> Option<(i64, i64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = parsed.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The SPIFFE URI SANs of a DER certificate (normally exactly one).
pub fn spiffe_ids(cert: &[u8]) -> Vec<SpiffeId> {
    uri_sans(cert).iter().filter_map(|u| SpiffeId::parse(u)).collect()
}

/// The URI subject alternative names of a DER certificate.
pub fn uri_sans(cert: &[u8]) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// A member's credentials in memory.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key(), roots: self.roots.clone() }
    }
}

impl fmt::Debug for Credentials {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("chain", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

impl Credentials {
    /// Reads a certificate chain, its key and the CA bundle from PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, IdentityError> {
        Ok(Self { chain: read_certs(cert)?, key: read_key(key)?, roots: read_certs(ca)? })
    }

    /// Loads member `name`'s files and checks them ([`Credentials::check_identity`]); a missing
    /// file says how to make it.
    pub fn load_member(paths: &crate::config::TlsPaths, trust_domain: &str, name: &str) -> Result<Self, IdentityError> {
        let missing = |path: &Path, how: String| IdentityError::Invalid {
            path: path.to_path_buf(),
            reason: format!("no such file; {how}"),
        };
        let dir = paths.cert.parent().map_or_else(|| ".".into(), |d| d.display().to_string());
        if !paths.ca.exists() {
            return Err(missing(
                &paths.ca,
                format!("create the CA with `quicmesh ca init --dir {dir}` or join with --join"),
            ));
        }
        for file in [&paths.cert, &paths.key] {
            if !file.exists() {
                return Err(missing(
                    file,
                    format!("issue it with `quicmesh ca issue --dir {dir} --node {name}`, or enroll with `quicmesh node --join`"),
                ));
            }
        }
        let creds = Self::load(&paths.ca, &paths.cert, &paths.key)?;
        creds.check_identity(&paths.cert, trust_domain, name)?;
        Ok(creds)
    }

    /// Checks that the certificate (read from `path`) names member `name` of `trust_domain` and
    /// has not expired: what peers will check, said before they refuse it.
    pub fn check_identity(&self, path: &Path, trust_domain: &str, name: &str) -> Result<(), IdentityError> {
        let bad = |reason: String| IdentityError::Invalid { path: path.to_path_buf(), reason };
        let leaf = self.chain.first().ok_or_else(|| bad("holds no certificate".into()))?;
        let expected = SpiffeId::node(trust_domain, name);
        let presented = spiffe_ids(leaf);
        if !presented.contains(&expected) {
            let shown: Vec<String> = presented.iter().map(ToString::to_string).collect();
            let shown = if shown.is_empty() { "no SPIFFE identity".to_string() } else { shown.join(", ") };
            return Err(bad(format!(
                "the certificate is for {shown}, but this member is {expected} (node name and mesh.trust_domain)"
            )));
        }
        if let Some((_, not_after)) = validity(leaf) {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            if not_after <= now {
                return Err(bad(format!(
                    "the certificate expired {} ago; issue a new one (`quicmesh ca issue`) or rejoin",
                    humantime::format_duration(Duration::from_secs((now - not_after) as u64))
                )));
            }
        }
        Ok(())
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

/// All certificates in a PEM file; an empty file is an error.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut data.as_slice()).collect();
    let certs = certs.map_err(|e| IdentityError::Invalid { path: path.into(), reason: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(IdentityError::Invalid { path: path.into(), reason: "no certificate in file".into() });
    }
    Ok(certs)
}

/// The first private key in a PEM file. Errors never include key bytes.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let data = fs::read(path).map_err(io_err(path))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|_| IdentityError::Invalid { path: path.into(), reason: "unreadable PEM private key".into() })?
        .ok_or_else(|| IdentityError::Invalid { path: path.into(), reason: "no private key in file".into() })
}

/// Writes a file readable only by its owner.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    #[cfg(unix)]
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io_err(path))?
    };
    #[cfg(not(unix))]
    let mut file = fs::File::create(path).map_err(io_err(path))?;
    // `mode` only applies on creation: tighten a file that existed before, before writing.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    file.write_all(data).map_err(io_err(path))?;
    Ok(())
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    fs::write(path, data).map_err(io_err(path))
}

/// The mesh CA held in a state directory.
pub struct Ca {
    pub dir: PathBuf,
    pub trust_domain: String,
    cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// Creates a new CA in `dir` (made if missing); refuses to overwrite an existing one.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Self, IdentityError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if dir.join("ca.key").exists() {
            return Err(IdentityError::Exists(dir.to_path_buf()));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "quicmesh");
        dn.push(DnType::CommonName, format!("quicmesh mesh CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_secret(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        write_public(&dir.join("ca.pem"), cert.pem().as_bytes())?;
        write_public(&dir.join("trust-domain"), format!("{trust_domain}\n").as_bytes())?;
        Ok(Self { dir: dir.into(), trust_domain: trust_domain.into(), cert_pem: cert.pem(), key })
    }

    /// Opens the CA written by [`Ca::init`].
    pub fn open(dir: &Path) -> Result<Self, IdentityError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| IdentityError::Io { path, source })
        };
        let cert_pem = read("ca.pem")?;
        let key = KeyPair::from_pem(&read("ca.key")?)
            .map_err(|_| IdentityError::Invalid { path: dir.join("ca.key"), reason: "unreadable CA key".into() })?;
        let trust_domain = read("trust-domain")?.trim().to_string();
        Ok(Self { dir: dir.into(), trust_domain, cert_pem, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate, hex: what `--ca-fingerprint` pins.
    pub fn fingerprint(&self) -> String {
        read_pem_der(&self.cert_pem).map(|der| fingerprint(&der)).unwrap_or_default()
    }

    /// Signs a node's certificate signing request. Only its public key is taken from the
    /// request: the identity and usages are the CA's choice, whatever the request asked for.
    pub fn sign_csr(&self, name: &str, csr_pem: &str, validity: Duration) -> Result<String, IdentityError> {
        let mut req = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
        req.params = self.node_params(name, not_before, validity)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        Ok(req.signed_by(&issuer)?.pem())
    }

    fn node_params(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        validity: Duration,
    ) -> Result<CertificateParams, IdentityError> {
        if !crate::config::valid_node_name(name) {
            return Err(IdentityError::BadName(name.into()));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let uri = SpiffeId::node(&self.trust_domain, name).to_string();
        let uri = uri.try_into().map_err(|_| IdentityError::BadName(name.into()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_before + validity;
        Ok(params)
    }

    /// Issues a node certificate valid from `not_before` for `validity`; returns (cert PEM, key PEM).
    pub fn issue_pem(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        validity: Duration,
    ) -> Result<(String, String), IdentityError> {
        let params = self.node_params(name, not_before, validity)?;
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues and writes `<dir>/<name>.pem` and `<dir>/<name>.key` (0600).
    pub fn issue(&self, name: &str, validity: Duration) -> Result<(PathBuf, PathBuf), IdentityError> {
        let not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
        let (cert, key) = self.issue_pem(name, not_before, validity)?;
        let cert_path = self.dir.join(format!("{name}.pem"));
        let key_path = self.dir.join(format!("{name}.key"));
        write_secret(&key_path, key.as_bytes())?;
        write_public(&cert_path, cert.as_bytes())?;
        Ok((cert_path, key_path))
    }
}

/// The subject of a certificate (DER) as RFC 4514 text, e.g. `CN=alice,O=Example`.
pub fn subject_of(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(parsed.subject().to_string())
}

/// The DER of the first certificate in a PEM text.
pub fn read_pem_der(pem: &str) -> Option<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok().map(|c| c.to_vec())
}

/// A key pair and a certificate signing request for node `name`: (key PEM, CSR PEM).
pub fn signing_request(name: &str) -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A self-signed certificate for `names`, for development edge TLS: (cert DER, key DER).
pub fn self_signed(names: &[String]) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), IdentityError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(names.to_vec())?;
    let cert = params.self_signed(&key)?;
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| IdentityError::Invalid { path: PathBuf::new(), reason: e.to_string() })?;
    Ok((cert.der().clone(), key))
}

/// Like [`self_signed`], as PEM: (certificate, private key).
pub fn self_signed_pem(names: &[String]) -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(names.to_vec())?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Hex SHA-256 of DER bytes, as `quicmesh ca fingerprint` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_cert_carries_spiffe_id_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path(), "example.org").unwrap();
        let (cert, key) = ca.issue("node-a", DEFAULT_NODE_VALIDITY).unwrap();
        let der = read_certs(&cert).unwrap();
        assert_eq!(spiffe_ids(&der[0]), vec![SpiffeId::node("example.org", "node-a")]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for path in [key, dir.path().join("ca.key")] {
                let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
        assert!(matches!(Ca::init(dir.path(), "example.org"), Err(IdentityError::Exists(_))));
        let reopened = Ca::open(dir.path()).unwrap();
        assert_eq!(reopened.trust_domain, "example.org");
        assert!(matches!(reopened.issue("Bad_Name", DEFAULT_NODE_VALIDITY), Err(IdentityError::BadName(_))));
    }

    #[test]
    fn spiffe_parse() {
        let id = SpiffeId::parse("spiffe://td/node/x").unwrap();
        assert_eq!(id.node_name(), Some("x"));
        assert!(SpiffeId::parse("https://td/node/x").is_none());
        assert!(SpiffeId::parse("spiffe://td").is_none());
    }
}
