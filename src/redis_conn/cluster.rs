//! What a Redis Cluster needs beyond routing by slot: its topology (`CLUSTER SLOTS`), `SCAN` on
//! every master, a subscriber connection on some node, and the health `doctor` reports.
//!
//! Pub/sub: classic `PUBLISH` on a cluster is broadcast over the cluster bus to every node, so a
//! subscriber connected to any one node (master or replica) receives every message. The token
//! cache's subscriber is such a plain connection to one node, tried in turn from the current
//! topology and the seed nodes: when that node goes away the subscription's stream ends, which
//! the cache already treats as a gap (it drops every cached token) before it subscribes again on
//! another node. (The cluster client's own RESP3 push subscriptions resubscribe silently after a
//! reconnect, so a gap would go unnoticed; sharded pub/sub would tie the channel to one slot's
//! master for no gain at this message rate.)

use std::sync::atomic::Ordering;

use redis::{
    cluster_routing::{RoutingInfo, SingleNodeRoutingInfo},
    RedisResult, Value,
};

use super::{not_connected, target::Target, RedisConn, RedisHandle, CONNECT_TIMEOUT};

/// One range of `CLUSTER SLOTS`: its master and replicas (`host`, `port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub master: (String, u16),
    pub replicas: Vec<(String, u16)>,
}

/// The cluster as `doctor` reports it.
#[derive(Debug, Clone)]
pub struct ClusterHealth {
    /// `cluster_state` of each master (`ok` / `fail`), by address.
    pub states: Vec<(String, String)>,
    /// Slots served by some master (of 16384).
    pub covered: u32,
    pub masters: usize,
    pub replicas: usize,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn node(v: &Value) -> Option<(String, u16)> {
    let Value::Array(parts) = v else { return None };
    let host = text(parts.first()?)?;
    let Value::Int(port) = parts.get(1)? else {
        return None;
    };
    Some((host, u16::try_from(*port).ok()?))
}

fn parse_slots(reply: &Value) -> Vec<SlotRange> {
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end))) = (parts.first(), parts.get(1))
            else {
                return None;
            };
            Some(SlotRange {
                start: u16::try_from(*start).ok()?,
                end: u16::try_from(*end).ok()?,
                master: node(parts.get(2)?)?,
                replicas: parts.iter().skip(3).filter_map(node).collect(),
            })
        })
        .collect()
}

fn by_address((host, port): &(String, u16)) -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
        host: host.clone(),
        port: *port,
    })
}

async fn route(
    conn: &mut RedisConn,
    cmd: &redis::Cmd,
    routing: Option<RoutingInfo>,
) -> RedisResult<Value> {
    match (conn, routing) {
        (RedisConn::Cluster(c), Some(routing)) => c.route_command(cmd.clone(), routing).await,
        (conn, _) => cmd.query_async(conn).await,
    }
}

impl RedisHandle {
    /// The cluster's slot ranges (`CLUSTER SLOTS`); empty when Redis is not a cluster.
    pub async fn cluster_slots(&self) -> RedisResult<Vec<SlotRange>> {
        if !matches!(self.shared.target, Target::Cluster(_)) {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        Ok(parse_slots(&reply))
    }

    /// Every key matching `pattern` (at most `limit`): `SCAN` on the one node, or on each
    /// master of a cluster in turn.
    pub async fn scan_keys(&self, pattern: &str, limit: usize) -> RedisResult<Vec<String>> {
        let mut conn = self.conn().await?;
        let masters: Vec<Option<RoutingInfo>> = if conn.is_cluster() {
            let mut seen = Vec::new();
            for range in self.cluster_slots().await? {
                if !seen.contains(&range.master) {
                    seen.push(range.master);
                }
            }
            seen.iter().map(|m| Some(by_address(m))).collect()
        } else {
            vec![None]
        };
        let mut keys = Vec::new();
        for routing in masters {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(500);
                let reply = route(&mut conn, &cmd, routing.clone()).await?;
                let (next, batch): (u64, Vec<String>) = redis::from_redis_value(reply)?;
                keys.extend(batch);
                if keys.len() >= limit {
                    keys.truncate(limit);
                    return Ok(keys);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(keys)
    }

    /// Each master's `cluster_state` and the slots covered (for `doctor`); `None` when Redis
    /// is not a cluster.
    pub async fn cluster_health(&self) -> RedisResult<Option<ClusterHealth>> {
        if !matches!(self.shared.target, Target::Cluster(_)) {
            return Ok(None);
        }
        let slots = self.cluster_slots().await?;
        let mut conn = self.conn().await?;
        let mut masters: Vec<(String, u16)> = Vec::new();
        let mut replicas = 0;
        let mut covered = 0u32;
        for range in &slots {
            covered += u32::from(range.end - range.start) + 1;
            if !masters.contains(&range.master) {
                masters.push(range.master.clone());
                replicas += range.replicas.len();
            }
        }
        let mut states = Vec::new();
        for master in &masters {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("INFO");
            let state = match route(&mut conn, &cmd, Some(by_address(master))).await {
                Ok(v) => text(&v)
                    .and_then(|info| {
                        info.lines()
                            .find_map(|l| l.strip_prefix("cluster_state:"))
                            .map(|s| s.trim().to_owned())
                    })
                    .unwrap_or_else(|| "unknown".into()),
                Err(e) => format!("unreachable ({:?})", e.kind()),
            };
            states.push((format!("{}:{}", master.0, master.1), state));
        }
        Ok(Some(ClusterHealth {
            states,
            covered,
            masters: masters.len(),
            replicas,
        }))
    }
}

impl RedisHandle {
    /// `cmd` on every master of a cluster (by address), or on the one node: each answer with
    /// the node it came from (`host:port`, or the URL without its password).
    pub async fn on_each_master(
        &self,
        cmd: &redis::Cmd,
    ) -> RedisResult<Vec<(String, RedisResult<Value>)>> {
        let mut conn = self.conn().await?;
        if !conn.is_cluster() {
            let answer = route(&mut conn, cmd, None).await;
            return Ok(vec![(self.shown_url().to_owned(), answer)]);
        }
        let mut masters: Vec<(String, u16)> = Vec::new();
        for range in self.cluster_slots().await? {
            if !masters.contains(&range.master) {
                masters.push(range.master);
            }
        }
        let mut out = Vec::new();
        for master in masters {
            let answer = route(&mut conn, cmd, Some(by_address(&master))).await;
            out.push((format!("{}:{}", master.0, master.1), answer));
        }
        Ok(out)
    }

    /// Connects to every node of the cluster (replicas included: they become masters in a
    /// failover) with the configured TLS and credentials and `PING`s it: `host:port` and the
    /// error, if any. Empty when Redis is not a cluster.
    pub async fn check_cluster_nodes(&self) -> Vec<(String, Option<redis::RedisError>)> {
        let Target::Cluster(target) = &self.shared.target else {
            return Vec::new();
        };
        let Ok(slots) = self.cluster_slots().await else {
            return Vec::new();
        };
        let mut nodes: Vec<(String, u16)> = Vec::new();
        for range in slots {
            for n in std::iter::once(range.master).chain(range.replicas) {
                if !nodes.contains(&n) {
                    nodes.push(n);
                }
            }
        }
        let mut out = Vec::new();
        for (host, port) in nodes {
            let attempt = async {
                let client = target.node_client(&host, port)?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            let error = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(not_connected("no answer in time")),
            };
            out.push((format!("{host}:{port}"), error));
        }
        out
    }
}

/// A subscriber connection to some node of the cluster: the nodes of the current topology and
/// the seeds, starting one further each call (a dead node is not tried first twice).
pub(super) async fn pubsub(handle: &RedisHandle) -> RedisResult<redis::aio::PubSub> {
    let Target::Cluster(target) = &handle.shared.target else {
        return Err(not_connected("not a cluster"));
    };
    let mut nodes: Vec<(String, u16)> = Vec::new();
    if handle.is_connected() {
        if let Ok(Ok(slots)) = tokio::time::timeout(CONNECT_TIMEOUT, handle.cluster_slots()).await {
            for range in slots {
                nodes.push(range.master);
                nodes.extend(range.replicas);
            }
        }
    }
    nodes.extend(target.seeds.iter().cloned());
    let mut unique: Vec<(String, u16)> = Vec::new();
    for n in nodes {
        if !unique.contains(&n) {
            unique.push(n);
        }
    }
    let start = handle.shared.next_node.fetch_add(1, Ordering::Relaxed);
    let mut last = not_connected("no cluster node to subscribe on");
    for i in 0..unique.len() {
        let (host, port) = &unique[(start + i) % unique.len()];
        let attempt = async {
            let client = target.node_client(host, *port)?;
            client.get_async_pubsub().await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(pubsub)) => return Ok(pubsub),
            Ok(Err(e)) => last = e,
            Err(_) => last = not_connected("subscribe timed out"),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_cluster_slots() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(5460),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id1")]),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id4")]),
        ])]);
        assert_eq!(
            parse_slots(&reply),
            vec![SlotRange {
                start: 0,
                end: 5460,
                master: ("127.0.0.1".into(), 7000),
                replicas: vec![("127.0.0.1".into(), 7003)],
            }]
        );
    }
}
