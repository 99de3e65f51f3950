//! A real Redis Cluster on loopback: `redis-server --cluster-enabled yes` per node, joined with
//! `redis-cli --cluster create` (plain or TLS), with helpers to find the master of a key and to
//! kill a master so that its replica takes over.

use std::time::Duration;

use redis::Value;
use tokio::process::Command;

use crate::{
    redis::{RedisServer, ServerOptions, ServerTls},
    wait::eventually,
};

/// Failure detection: a master silent this long is failed over (small, so tests stay fast).
pub const NODE_TIMEOUT_MS: u64 = 1000;

pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    tls: Option<ServerTls>,
    key_prefix: String,
}

fn text(v: Value) -> String {
    redis::from_redis_value::<String>(v).unwrap_or_default()
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, plain TCP.
    pub async fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::launch(masters, replicas, None, None).await
    }

    /// As [`RedisCluster::start`], TLS only (client port, replication and the cluster bus),
    /// with a password.
    pub async fn start_tls(
        masters: usize,
        replicas: usize,
        tls: ServerTls,
        password: &str,
    ) -> RedisCluster {
        Self::launch(masters, replicas, Some(tls), Some(password.to_owned())).await
    }

    async fn launch(
        masters: usize,
        replicas: usize,
        tls: Option<ServerTls>,
        password: Option<String>,
    ) -> RedisCluster {
        let opts = ServerOptions {
            tls: tls.clone(),
            password: password.clone(),
            cluster_node_timeout_ms: Some(NODE_TIMEOUT_MS),
            ..ServerOptions::default()
        };
        let starts = (0..masters * (1 + replicas)).map(|_| RedisServer::start_with(opts.clone()));
        let nodes = futures_join_all(starts).await;
        let key_prefix = nodes[0].key_prefix();
        let mut cli = Command::new("redis-cli");
        cli.arg("--cluster").arg("create");
        for n in &nodes {
            cli.arg(format!("127.0.0.1:{}", n.port()));
        }
        cli.arg("--cluster-replicas")
            .arg(replicas.to_string())
            .arg("--cluster-yes");
        if let Some(tls) = &tls {
            cli.arg("--tls")
                .arg("--cacert")
                .arg(&tls.ca_file)
                .arg("--cert")
                .arg(&tls.client.cert)
                .arg("--key")
                .arg(&tls.client.key);
        }
        if let Some(password) = &password {
            cli.env("REDISCLI_AUTH", password);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cli.output())
            .await
            .expect("redis-cli --cluster create finishes")
            .expect("run redis-cli (apt-get install redis-tools; scripts/test.sh does)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster {
            nodes,
            tls,
            key_prefix,
        };
        cluster.wait_healthy(masters, replicas).await;
        cluster
    }

    /// Until every live node says `cluster_state:ok`, knows every other node, and every master
    /// has its replicas connected and in sync.
    pub async fn wait_healthy(&self, masters: usize, replicas: usize) {
        let total = self.nodes.len();
        eventually(30, "the cluster to be ok on every node", || async {
            for n in &self.nodes {
                let info = text(self.query(n.port(), &["CLUSTER", "INFO"]).await?);
                if !info.contains("cluster_state:ok")
                    || !info.contains(&format!("cluster_known_nodes:{total}"))
                {
                    return None;
                }
            }
            Some(())
        })
        .await;
        if replicas > 0 {
            eventually(30, "every replica to be in sync", || async {
                let slots = self.slots().await?;
                let mut synced = 0;
                for (_, _, master, _) in &slots {
                    let info = text(self.query(*master, &["INFO", "replication"]).await?);
                    synced += info.matches("state=online").count();
                }
                (synced >= masters * replicas).then_some(())
            })
            .await;
        }
    }

    /// `redis+cluster://127.0.0.1:p1,…` (`rediss+cluster://:password@…` with TLS) naming the
    /// first three nodes as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .take(3)
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        match &self.tls {
            Some(_) => {
                let url = self.nodes[0].url();
                // `rediss://:password@127.0.0.1:P/` → the password part.
                let auth = url
                    .strip_prefix("rediss://")
                    .and_then(|r| r.split_once('@'))
                    .map(|(a, _)| format!("{a}@"))
                    .unwrap_or_default();
                format!("rediss+cluster://{auth}{}", seeds.join(","))
            }
            None => format!("redis+cluster://{}", seeds.join(",")),
        }
    }

    pub fn key_prefix(&self) -> String {
        self.key_prefix.clone()
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// One command on one node (as the harness connects); `None` when it fails.
    pub async fn query(&self, port: u16, args: &[&str]) -> Option<Value> {
        let node = self.nodes.iter().find(|n| n.port() == port)?;
        let client = node.client();
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query_async::<Value>(&mut conn).await.ok()
        };
        tokio::time::timeout(Duration::from_secs(2), attempt)
            .await
            .ok()
            .flatten()
    }

    /// `CLUSTER SLOTS` as some live node sees it: (start, end, master port, replica ports).
    pub async fn slots(&self) -> Option<Vec<(u16, u16, u16, Vec<u16>)>> {
        for port in self.ports() {
            let Some(Value::Array(ranges)) = self.query(port, &["CLUSTER", "SLOTS"]).await else {
                continue;
            };
            let port_of = |v: &Value| match v {
                Value::Array(parts) => match parts.get(1) {
                    Some(Value::Int(p)) => u16::try_from(*p).ok(),
                    _ => None,
                },
                _ => None,
            };
            let mut out = Vec::new();
            for range in ranges {
                let Value::Array(parts) = range else { continue };
                let (Some(Value::Int(start)), Some(Value::Int(end))) =
                    (parts.first(), parts.get(1))
                else {
                    continue;
                };
                let Some(master) = parts.get(2).and_then(port_of) else {
                    continue;
                };
                let replicas = parts.iter().skip(3).filter_map(port_of).collect();
                out.push((*start as u16, *end as u16, master, replicas));
            }
            return Some(out);
        }
        None
    }

    /// The port of the master serving `key`'s slot, and its replicas'.
    pub async fn master_of(&self, key: &str) -> (u16, Vec<u16>) {
        let port = self.ports()[0];
        let slot = self
            .query(port, &["CLUSTER", "KEYSLOT", key])
            .await
            .and_then(|v| redis::from_redis_value::<i64>(v).ok())
            .expect("CLUSTER KEYSLOT") as u16;
        let slots = self.slots().await.expect("CLUSTER SLOTS");
        slots
            .into_iter()
            .find(|(start, end, _, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, master, replicas)| (master, replicas))
            .expect("a master for the slot")
    }

    /// Kills the master serving `key` (SIGKILL) once its replicas hold everything it
    /// acknowledged, and returns (its port, the replica that will take over).
    ///
    /// Redis replicates asynchronously: a write acknowledged in the last moments before a master
    /// dies can be lost with it (Redis's own caveat, not the client's). So, as a planned
    /// failover does, writes are paused first (`CLIENT PAUSE … WRITE`: clients' writes wait
    /// and then fail with the connection) and the replica is let catch up; then the process
    /// is killed mid-run, with requests and jobs in flight.
    pub async fn kill_master_of(&mut self, key: &str) -> (u16, u16) {
        let (master, replicas) = self.master_of(key).await;
        let replica = *replicas.first().expect("the master has a replica");
        self.query(master, &["CLIENT", "PAUSE", "30000", "WRITE"])
            .await
            .expect("CLIENT PAUSE");
        eventually(
            10,
            "the replica to hold all the master's writes",
            || async {
                let m = text(self.query(master, &["INFO", "replication"]).await?);
                let offset = m
                    .lines()
                    .find_map(|l| l.strip_prefix("master_repl_offset:"))?
                    .trim()
                    .to_owned();
                let r = text(self.query(replica, &["INFO", "replication"]).await?);
                let replica_offset = r
                    .lines()
                    .find_map(|l| l.strip_prefix("slave_repl_offset:"))?
                    .trim()
                    .to_owned();
                (offset == replica_offset).then_some(())
            },
        )
        .await;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port() == master)
            .expect("the master is ours");
        node.kill().await;
        (master, replica)
    }

    /// Until `port` is a master and every live node says `cluster_state:ok` again.
    pub async fn wait_promoted(&self, port: u16, dead: u16) {
        eventually(30, "the replica to be promoted", || async {
            let role = self.query(port, &["ROLE"]).await?;
            format!("{role:?}").contains("master").then_some(())
        })
        .await;
        eventually(30, "the cluster to be ok again", || async {
            for p in self.ports().into_iter().filter(|p| *p != dead) {
                let info = text(self.query(p, &["CLUSTER", "INFO"]).await?);
                if !info.contains("cluster_state:ok") {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }
}

/// Runs `futures` at once (each on its own task) and returns their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("node start"));
    }
    out
}
