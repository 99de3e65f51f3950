//! TLS of the BFF's outgoing connections: one rustls stack with one crypto provider (aws-lc-rs,
//! the one reqwest and jsonwebtoken use too) for Redis (`rediss://`), LibreChat and the identity
//! service.
//!
//! Trust: with a `tls_ca_file` set, only the certificates of that PEM bundle are trusted for that
//! service (a private CA); without one, the system's trusted roots. Certificates are always
//! verified, host names included: there is no "insecure" switch.

use std::sync::{Arc, Once};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use crate::config::ConfigError;

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// The process's rustls crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Makes aws-lc-rs the process default (the Redis client builds its TLS configuration with
/// rustls' default provider). Idempotent.
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only when another provider was installed first: that one stays.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// Reads a file a setting names; the error names the setting and the path.
pub fn read_file(key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// The certificates of a PEM bundle (`key` names the setting in errors). At least one.
pub fn parse_certificates(
    key: &str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{path} is not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    Ok(certs)
}

/// Checks that `pem` holds a private key (PKCS#8, PKCS#1 or SEC1).
pub fn check_private_key(key: &str, path: &str, pem: &[u8]) -> Result<(), ConfigError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|e| invalid(key, format!("{path} holds no PEM private key: {e}")))
}

/// A CA bundle (`tls_ca_file`) read and checked.
#[derive(Clone)]
pub struct CaBundle {
    pub pem: Vec<u8>,
    pub certs: Vec<CertificateDer<'static>>,
}

impl CaBundle {
    /// `None` for an empty path (the system's roots).
    pub fn load(key: &str, path: &str) -> Result<Option<Self>, ConfigError> {
        if path.is_empty() {
            return Ok(None);
        }
        let pem = read_file(key, path)?;
        let certs = parse_certificates(key, path, &pem)?;
        Ok(Some(Self { pem, certs }))
    }
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaBundle({} certificates)", self.certs.len())
    }
}

/// The rustls configuration of calls to a service: the bundle's certificates when given, else
/// the system's trusted roots (the platform verifier, as reqwest uses). No ALPN: the HTTP
/// connector sets its own.
pub fn http_client_config(key: &str, ca: Option<&CaBundle>) -> Result<ClientConfig, ConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(key, format!("TLS setup failed: {e}")))?;
    let config = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in &ca.certs {
                roots
                    .add(cert.clone())
                    .map_err(|e| invalid(key, format!("not a usable CA certificate: {e}")))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| invalid(key, format!("cannot load the system's trusted roots: {e}")))?
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// A reqwest builder trusting `ca` (only it) when given, else the system's roots (reqwest's
/// default, the platform verifier; same rustls stack).
pub fn reqwest_trust(
    builder: reqwest::ClientBuilder,
    key: &str,
    ca: Option<&CaBundle>,
) -> Result<reqwest::ClientBuilder, ConfigError> {
    let Some(ca) = ca else {
        return Ok(builder);
    };
    let certs = reqwest::Certificate::from_pem_bundle(&ca.pem)
        .map_err(|e| invalid(key, format!("not a PEM certificate bundle: {e}")))?;
    Ok(builder.tls_certs_only(certs))
}

/// An error and its causes, `outer: inner: innermost` (reqwest and hyper keep the useful part,
/// e.g. "invalid peer certificate: UnknownIssuer", in the sources). The inner error of an
/// `io::Error` is included: that is where rustls' verdict travels.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut seen = vec![out.clone()];
    let mut push = |text: String, out: &mut String| {
        if !text.is_empty() && !seen.iter().any(|s| s.contains(&text)) {
            out.push_str(": ");
            out.push_str(&text);
            seen.push(text);
        }
    };
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                push(inner.to_string(), &mut out);
            }
        }
        current = err.source();
        if let Some(next) = current {
            push(next.to_string(), &mut out);
        }
    }
    out
}

/// Whether the error (or a cause) is a TLS verdict: a certificate not trusted, a name mismatch,
/// a failed handshake.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        current = err.source();
    }
    let text = error_chain(e).to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_without_certificates_is_refused_naming_the_key() {
        let err = parse_certificates("librechat.tls_ca_file", "/x.pem", b"hello")
            .expect_err("no certificate")
            .to_string();
        assert!(err.contains("librechat.tls_ca_file"), "{err}");
        assert!(err.contains("/x.pem"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = CaBundle::load("identity.tls_ca_file", "/nonexistent/ca.pem")
            .expect_err("missing")
            .to_string();
        assert!(err.contains("identity.tls_ca_file"), "{err}");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
