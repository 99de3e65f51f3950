//! TLS for the tests: a throw-away certificate authority made by the test (never a file in the
//! repository), certificates it issues for `127.0.0.1`/`localhost` as PEM files in a temp dir,
//! and [`TlsFront`], an HTTPS front for the in-process fakes (it terminates TLS and forwards the
//! bytes to the fake's plain-HTTP port, as an ingress would).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// PEM armour of DER bytes (64-column base64).
fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority of this test only.
pub struct TestCa {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_file: PathBuf,
    issued: std::sync::atomic::AtomicUsize,
}

impl TestCa {
    /// A new CA (ECDSA P-256) named `name`; its certificate is in [`TestCa::ca_file`].
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("bff-ca-")
            .tempdir()
            .expect("temp dir for the test CA");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, pem("CERTIFICATE", cert.der())).expect("write ca.pem");
        TestCa {
            dir,
            issuer: Issuer::new(params, key),
            ca_file,
            issued: Default::default(),
        }
    }

    /// The CA certificate (PEM): what a client trusts.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn ca_file_string(&self) -> String {
        self.ca_file.display().to_string()
    }

    /// A certificate for `127.0.0.1` and `localhost`, usable by servers and clients (Redis
    /// uses its server certificate as a client certificate for replication and the cluster bus).
    pub fn issue(&self, name: &str) -> CertFiles {
        self.issue_until(name, None)
    }

    /// [`TestCa::issue`], valid until `not_after` (rcgen's default: the year 4096).
    pub fn issue_until(&self, name: &str, not_after: Option<time::OffsetDateTime>) -> CertFiles {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if let Some(not_after) = not_after {
            params.not_after = not_after;
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let n = self
            .issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let files = CertFiles {
            cert: self.dir.path().join(format!("{name}-{n}.crt")),
            key: self.dir.path().join(format!("{name}-{n}.key")),
        };
        std::fs::write(&files.cert, pem("CERTIFICATE", cert.der())).expect("write cert");
        std::fs::write(&files.key, pem("PRIVATE KEY", &key.serialize_der())).expect("write key");
        files
    }

    /// A rustls server configuration with a new certificate of this CA.
    pub fn server_config(&self, name: &str) -> Arc<rustls::ServerConfig> {
        self.server_config_until(name, None)
    }

    /// [`TestCa::server_config`] with a certificate valid until `not_after`.
    pub fn server_config_until(
        &self,
        name: &str,
        not_after: Option<time::OffsetDateTime>,
    ) -> Arc<rustls::ServerConfig> {
        let files = self.issue_until(name, not_after);
        let certs = CertificateDer::pem_file_iter(&files.cert)
            .expect("cert file")
            .collect::<Result<Vec<_>, _>>()
            .expect("certs");
        let key = PrivateKeyDer::from_pem_file(&files.key).expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// An HTTPS front: accepts TLS on `127.0.0.1:<port>` with a certificate of a [`TestCa`] and
/// forwards each connection to `target` in plain TCP. Stops when dropped.
pub struct TlsFront {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsFront {
    pub async fn start(target: SocketAddr, config: Arc<rustls::ServerConfig>) -> TlsFront {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the TLS front");
        let addr = listener.local_addr().expect("front address");
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        conns.spawn(async move {
                            // A client that refuses our certificate ends its handshake here.
                            let Ok(mut tls) = acceptor.accept(stream).await else { return };
                            let Ok(mut plain) = TcpStream::connect(target).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        TlsFront { addr, task }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
