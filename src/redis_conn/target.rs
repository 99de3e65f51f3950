//! `redis.url` (and the `[redis]` TLS files) → what to connect to.
//!
//! | URL | topology |
//! |---|---|
//! | `redis://[[user]:password@]host:port[/db]`, `rediss://…` | one node (TLS with `rediss`) |
//! | `unix:///path[?db=N]`, `redis+unix:///path` | one node on a unix socket |
//! | `redis+sentinel://[[user]:password@]h1:p1[,h2:p2…]/<master>[/db]`, `rediss+sentinel://…` | the master Sentinel names (TLS to the sentinels and the master with `rediss`) |
//! | `redis+cluster://[[user]:password@]h1:p1[,h2:p2…]`, `rediss+cluster://…` | a Redis Cluster, from its seed nodes (TLS to every node with `rediss`) |
//!
//! User and password are percent-decoded; the password of the Sentinel and Cluster forms is the
//! nodes' (not the sentinels').

use std::time::Duration;

use percent_encoding::percent_decode_str;
use redis::{
    cluster::{ClusterClient, ClusterClientBuilder},
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates, TlsMode,
};
use tokio::sync::Mutex;

use crate::{config_error::ConfigError, tls};

use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};

pub(super) fn invalid(reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: "redis.url".into(),
        reason: reason.into(),
    }
}

/// The `[redis]` TLS files, read and checked: the CA bundle that replaces the system's roots,
/// and the client certificate with its key (mutual TLS).
#[derive(Clone, Default)]
pub struct RedisTls {
    ca: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    /// Reads `redis.tls_ca_file`, `tls_cert_file` and `tls_key_file` (empty: not used); each
    /// error names its key and file.
    pub fn from_files(ca_file: &str, cert_file: &str, key_file: &str) -> Result<Self, ConfigError> {
        let ca = match ca_file {
            "" => None,
            path => {
                let pem = tls::read_file("redis.tls_ca_file", path)?;
                tls::parse_certificates("redis.tls_ca_file", path, &pem)?;
                Some(pem)
            }
        };
        let client = match (cert_file, key_file) {
            ("", "") => None,
            ("", _) | (_, "") => {
                return Err(ConfigError::Invalid {
                    key: "redis.tls_cert_file".into(),
                    reason: "set both redis.tls_cert_file and redis.tls_key_file (a client \
                             certificate needs its key), or neither"
                        .into(),
                })
            }
            (cert_path, key_path) => {
                let cert = tls::read_file("redis.tls_cert_file", cert_path)?;
                tls::parse_certificates("redis.tls_cert_file", cert_path, &cert)?;
                let key = tls::read_file("redis.tls_key_file", key_path)?;
                tls::check_private_key("redis.tls_key_file", key_path, &key)?;
                Some((cert, key))
            }
        };
        Ok(Self { ca, client })
    }

    pub fn is_configured(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: self.ca.clone(),
        }
    }
}

/// Which kind of deployment `redis.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Single,
    Unix,
    Sentinel,
    Cluster,
}

/// What the handle connects to.
pub(super) enum Target {
    Direct(redis::Client),
    Sentinel(Mutex<SentinelClient>),
    Cluster(Box<ClusterTarget>),
}

pub(super) struct ClusterTarget {
    /// The shared connection's client (response timeout, few quick retries).
    pub shared: ClusterClient,
    /// Blocking reads' client: no response timeout (the reader bounds its own waits).
    pub reader: ClusterClient,
    /// The seed nodes of the URL.
    pub seeds: Vec<(String, u16)>,
    tls: Option<RedisTls>,
    username: Option<String>,
    password: Option<String>,
}

impl ClusterTarget {
    /// A plain client for one node of the cluster (pub/sub, which any node serves: `PUBLISH`
    /// reaches every node over the cluster bus).
    pub fn node_client(&self, host: &str, port: u16) -> redis::RedisResult<redis::Client> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(user) = &self.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let info = format!("{scheme}://{}:{port}/", bracket(host))
            .into_connection_info()?
            .set_redis_settings(settings);
        match &self.tls {
            Some(tls) => redis::Client::build_with_tls(info, tls.certificates()),
            None => redis::Client::open(info),
        }
    }
}

/// An IPv6 literal in brackets, for a URL.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// `redis+cluster://`, `rediss+sentinel://`, … → (TLS?, kind, rest after `://`).
fn scheme(url: &str) -> Option<(bool, Topology, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let found = match scheme {
        "redis" => (false, Topology::Single),
        "rediss" => (true, Topology::Single),
        "unix" | "redis+unix" => (false, Topology::Unix),
        "redis+sentinel" => (false, Topology::Sentinel),
        "rediss+sentinel" => (true, Topology::Sentinel),
        "redis+cluster" => (false, Topology::Cluster),
        "rediss+cluster" => (true, Topology::Cluster),
        _ => return None,
    };
    Some((found.0, found.1, rest))
}

const SCHEMES: &str = "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, \
                       redis+cluster:// or rediss+cluster://";

/// The topology and whether TLS is used; an error (naming `redis.url`) for an unknown scheme.
pub fn describe(url: &str) -> Result<(Topology, bool), ConfigError> {
    scheme(url)
        .map(|(tls, topology, _)| (topology, tls))
        .ok_or_else(|| invalid(format!("must start with {SCHEMES}")))
}

/// Checks the whole URL (scheme, hosts, ports, Sentinel master, `#insecure`) without
/// connecting: the configuration's check. The TLS files are read when the handle is built.
pub fn check(url: &str) -> Result<(Topology, bool), ConfigError> {
    let described = describe(url)?;
    build(url, &RedisTls::default())?;
    Ok(described)
}

/// The URL with its password replaced by `***`, for logs, errors and `doctor`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let Some((auth, hosts)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let auth = match auth.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{scheme}://{auth}@{hosts}{path}")
}

fn decode(part: &str) -> String {
    percent_decode_str(part).decode_utf8_lossy().into_owned()
}

/// `[user:password@]h1:p1[,h2:p2…]` → credentials and hosts (the path is the caller's).
#[allow(clippy::type_complexity)]
fn hosts_and_auth(
    authority: &str,
) -> Result<(Option<String>, Option<String>, Vec<(String, u16)>), ConfigError> {
    let (auth, hosts) = match authority.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, authority),
    };
    let (mut user, mut password) = (None, None);
    if let Some(auth) = auth {
        // A bare `secret@` is a password, as in `redis://:secret@`.
        let (u, p) = auth.split_once(':').unwrap_or(("", auth));
        if !u.is_empty() {
            user = Some(decode(u));
        }
        if !p.is_empty() {
            password = Some(decode(p));
        }
    }
    let mut nodes = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) if !name.ends_with(':') || name.starts_with('[') => (name, port),
            _ => {
                return Err(invalid(format!(
                    "`{host}` is not host:port (every node needs its port)"
                )))
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| invalid(format!("`{host}`: `{port}` is not a port")))?;
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if name.is_empty() {
            return Err(invalid(format!("`{host}` has no host name")));
        }
        nodes.push((name.to_owned(), port));
    }
    if nodes.is_empty() {
        return Err(invalid("needs at least one host:port"));
    }
    Ok((user, password, nodes))
}

fn tls_addr(host: &str, port: u16) -> Result<ConnectionAddr, ConfigError> {
    format!("rediss://{}:{port}/", bracket(host))
        .into_connection_info()
        .map(|i| i.addr().clone())
        .map_err(|e| {
            invalid(format!(
                "`{host}:{port}` is not a node address ({:?})",
                e.kind()
            ))
        })
}

/// Builds the target of `url`. TLS files only go with a TLS URL (checked by the config too).
pub(super) fn build(url: &str, tls: &RedisTls) -> Result<Target, ConfigError> {
    let (use_tls, topology, rest) =
        scheme(url).ok_or_else(|| invalid(format!("must start with {SCHEMES}")))?;
    if tls.is_configured() && !use_tls {
        return Err(ConfigError::Invalid {
            key: "redis.tls_ca_file".into(),
            reason: "TLS files are set but redis.url does not use TLS (rediss://, \
                     rediss+sentinel:// or rediss+cluster://)"
                .into(),
        });
    }
    if url.contains("#insecure") {
        return Err(invalid(
            "`#insecure` (no certificate verification) is not supported: trust your Redis's CA \
             with redis.tls_ca_file",
        ));
    }
    crate::tls::install_provider();
    match topology {
        Topology::Single | Topology::Unix => {
            let client = if use_tls && tls.is_configured() {
                redis::Client::build_with_tls(url, tls.certificates())
            } else {
                redis::Client::open(url)
            };
            client
                .map(Target::Direct)
                .map_err(|e| invalid(format!("not a Redis URL ({:?})", e.kind())))
        }
        Topology::Sentinel => sentinel(rest, use_tls, tls).map(|c| Target::Sentinel(Mutex::new(c))),
        Topology::Cluster => cluster(rest, use_tls, tls).map(|c| Target::Cluster(Box::new(c))),
    }
}

/// `[user:password@]h1:p1[,h2:p2…]/<master>[/<db>]`.
fn sentinel(rest: &str, use_tls: bool, tls: &RedisTls) -> Result<SentinelClient, ConfigError> {
    let (authority, path) = rest
        .split_once('/')
        .ok_or_else(|| invalid("a Sentinel URL needs /<master name> after the hosts"))?;
    let mut path = path.split('/');
    let master = path
        .next()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("a Sentinel URL needs /<master name> after the hosts"))?;
    let db: i64 = match path.next().filter(|d| !d.is_empty()) {
        Some(d) => d
            .parse()
            .map_err(|_| invalid(format!("`{d}` is not a database number")))?,
        None => 0,
    };
    let (user, password, hosts) = hosts_and_auth(authority)?;
    let addrs = hosts
        .iter()
        .map(|(h, p)| {
            if use_tls {
                tls_addr(h, *p)
            } else {
                Ok(ConnectionAddr::Tcp(h.clone(), *p))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let built = |e: redis::RedisError| invalid(format!("not a Sentinel URL ({:?})", e.kind()));
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(built)?
        .set_client_to_redis_db(db);
    if let Some(user) = user {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = password {
        builder = builder.set_client_to_redis_password(password);
    }
    if use_tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if tls.is_configured() {
            builder = builder
                .set_client_to_redis_certificates(tls.certificates())
                .set_client_to_sentinel_certificates(tls.certificates());
        }
    }
    builder.build().map_err(built)
}

/// `[user:password@]h1:p1[,h2:p2…][/]`: seed nodes; the cluster tells the rest.
fn cluster(rest: &str, use_tls: bool, tls: &RedisTls) -> Result<ClusterTarget, ConfigError> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err(invalid(
            "a Cluster URL is redis+cluster://[user:password@]host:port[,host:port…] with no \
             path (a cluster has database 0 only)",
        ));
    }
    let (username, password, seeds) = hosts_and_auth(authority)?;
    let target = ClusterTarget {
        shared: cluster_client(&seeds, use_tls, tls, &username, &password, true)?,
        reader: cluster_client(&seeds, use_tls, tls, &username, &password, false)?,
        seeds,
        tls: use_tls.then(|| tls.clone()),
        username,
        password,
    };
    Ok(target)
}

fn cluster_client(
    seeds: &[(String, u16)],
    use_tls: bool,
    tls: &RedisTls,
    username: &Option<String>,
    password: &Option<String>,
    shared: bool,
) -> Result<ClusterClient, ConfigError> {
    let scheme = if use_tls { "rediss" } else { "redis" };
    let nodes = seeds
        .iter()
        .map(|(h, p)| {
            format!("{scheme}://{}:{p}/", bracket(h))
                .into_connection_info()
                .map_err(|e| invalid(format!("`{h}:{p}` is not a node address ({:?})", e.kind())))
        })
        .collect::<Result<Vec<ConnectionInfo>, _>>()?;
    let mut builder = ClusterClientBuilder::new(nodes)
        .connection_timeout(CONNECT_TIMEOUT)
        // A failover takes the cluster a few seconds: retry briefly (a request then gets 503 and
        // the next one finds the new master), not the client's default of 16 times.
        .retries(3)
        .min_retry_wait(100)
        .max_retry_wait(1000);
    builder = if shared {
        builder
            .response_timeout(RESPONSE_TIMEOUT)
            .overall_response_timeout(Some(RESPONSE_TIMEOUT + Duration::from_secs(2)))
    } else {
        builder.overall_response_timeout(None)
    };
    if let Some(user) = username {
        builder = builder.username(user);
    }
    if let Some(password) = password {
        builder = builder.password(password);
    }
    if use_tls {
        builder = builder.tls(TlsMode::Secure);
        if tls.is_configured() {
            builder = builder.certs(tls.certificates());
        }
    }
    builder
        .build()
        .map_err(|e| invalid(format!("not a Cluster URL ({:?}: {e})", e.kind())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
            ("rediss://user:s3cret@h:6379", "rediss://user:***@h:6379"),
            (
                "rediss+cluster://:s3cret@a:1,b:2",
                "rediss+cluster://:***@a:1,b:2",
            ),
            (
                "redis+sentinel://s3cret@a:1/mymaster",
                "redis+sentinel://***@a:1/mymaster",
            ),
            ("redis://h:6379/", "redis://h:6379/"),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ] {
            assert_eq!(redact(url), shown);
            assert!(!redact(url).contains("s3cret"));
        }
    }

    #[test]
    fn cluster_urls_are_checked() {
        let none = RedisTls::default();
        assert!(build("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", &none).is_ok());
        assert!(build("rediss+cluster://u:p%40ss@[::1]:7000", &none).is_ok());
        for (url, expect) in [
            ("redis+cluster://", "at least one host:port"),
            ("redis+cluster://127.0.0.1", "host:port"),
            ("redis+cluster://127.0.0.1:x", "not a port"),
            ("redis+cluster://127.0.0.1:7000/1", "no path"),
            ("rediss://127.0.0.1:6379/#insecure", "#insecure"),
            ("http://127.0.0.1:6379", "must start with"),
        ] {
            let err = build(url, &none).err().expect(url).to_string();
            assert!(err.contains(expect), "{url}: {err}");
            assert!(err.contains("redis.url"), "{url}: {err}");
        }
    }

    #[test]
    fn decodes_credentials() {
        let (user, password, hosts) = hosts_and_auth("us%3Aer:p%40ss@a:1,[::1]:2").expect("ok");
        assert_eq!(user.as_deref(), Some("us:er"));
        assert_eq!(password.as_deref(), Some("p@ss"));
        assert_eq!(hosts, vec![("a".into(), 1), ("::1".into(), 2)]);
    }
}
