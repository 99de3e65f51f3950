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

use crate::config_error::ConfigError;

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
    client_config(key, ca, None)
}

/// A client certificate chain and its key.
pub type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// [`http_client_config`], presenting `identity` when a server asks for a client certificate.
pub fn client_config(
    key: &str,
    ca: Option<&CaBundle>,
    identity: Option<ClientIdentity>,
) -> Result<ClientConfig, ConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(key, format!("TLS setup failed: {e}")))?;
    let builder = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in &ca.certs {
                roots
                    .add(cert.clone())
                    .map_err(|e| invalid(key, format!("not a usable CA certificate: {e}")))?;
            }
            builder.with_root_certificates(roots)
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| invalid(key, format!("cannot load the system's trusted roots: {e}")))?
        }
    };
    match identity {
        Some((chain, private_key)) => builder
            .with_client_auth_cert(chain, private_key)
            .map_err(|e| invalid(key, format!("not a usable client certificate: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The `[redis]` TLS files (`tls_ca_file`, `tls_cert_file`, `tls_key_file`; empty: not used) as a
/// rustls configuration (for `doctor`'s own handshakes).
pub fn redis_client_config(
    ca_file: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<ClientConfig, ConfigError> {
    let ca = CaBundle::load("redis.tls_ca_file", ca_file)?;
    let identity = match (cert_file, key_file) {
        ("", _) | (_, "") => None,
        (cert_path, key_path) => {
            let pem = read_file("redis.tls_cert_file", cert_path)?;
            let chain = parse_certificates("redis.tls_cert_file", cert_path, &pem)?;
            let pem = read_file("redis.tls_key_file", key_path)?;
            let private_key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
                invalid(
                    "redis.tls_key_file",
                    format!("{key_path} holds no PEM private key: {e}"),
                )
            })?;
            Some((chain, private_key))
        }
    };
    client_config("redis.tls_ca_file", ca.as_ref(), identity)
}

/// Connects to `host:port`, completes a verified TLS handshake with `config` and answers when
/// the server's certificate stops being valid (its `notAfter`).
pub async fn certificate_expiry(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
) -> Result<time::OffsetDateTime, String> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is not a host name: {e}"))?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| error_chain(&e))
    };
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), handshake)
        .await
        .map_err(|_| "no TLS handshake within 5 s".to_owned())??;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or("the server sent no certificate")?;
    not_after(leaf).ok_or_else(|| "cannot read the certificate's validity".to_owned())
}

/// One DER element: (tag, contents, the rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `notAfter` of an X.509 certificate: Certificate → TBSCertificate → [version], serial,
/// signature, issuer, validity { notBefore, notAfter }.
fn not_after(cert: &[u8]) -> Option<time::OffsetDateTime> {
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der(rest)?.2;
    }
    for _ in 0..3 {
        rest = der(rest)?.2; // serial, signature algorithm, issuer
    }
    let (0x30, validity, _) = der(rest)? else {
        return None;
    };
    let (_, _, rest) = der(validity)?;
    let (tag, time, _) = der(rest)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime: YYMMDDHHMMSS, 1950..2049.
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        // GeneralizedTime: YYYYMMDDHHMMSS.
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let two = |i: usize| rest.get(i..i + 2)?.parse::<u8>().ok();
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(two(0)?).ok()?, two(2)?).ok()?;
    let at = time::Time::from_hms(two(4)?, two(6)?, two(8)?).ok()?;
    Some(time::PrimitiveDateTime::new(date, at).assume_utc())
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

    /// A DER element of `tag` around `content` (short or long length form).
    fn element(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(content.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(content);
        out
    }

    #[test]
    fn reads_not_after_in_both_time_forms() {
        for (tag, text, expected) in [
            (0x17u8, "491231235959Z", "2049-12-31 23:59:59"),
            (0x17, "500101000000Z", "1950-01-01 0:00:00"),
            (0x18, "40960101000000Z", "4096-01-01 0:00:00"),
        ] {
            let validity = [
                element(0x17, b"200101000000Z"),
                element(tag, text.as_bytes()),
            ]
            .concat();
            let tbs = [
                element(0xa0, &element(0x02, &[2])),
                element(0x02, &[1; 20]),
                element(0x30, &[0; 10]),
                element(0x30, &[0; 200]),
                element(0x30, &validity),
                element(0x30, &[0; 40]),
            ]
            .concat();
            let cert = element(
                0x30,
                &[element(0x30, &tbs), element(0x30, &[0; 12])].concat(),
            );
            let at = not_after(&cert).expect(text);
            assert!(
                at.to_string().starts_with(expected),
                "{text}: {at} vs {expected}"
            );
        }
        assert!(not_after(b"\x30\x05garbage").is_none());
    }

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
