//! One connection type for every Redis topology the service supports: a single node (plain,
//! TLS, unix socket, or the master Sentinel names) or a Redis Cluster.
//!
//! Everything that talks to Redis (the queue here, the service's sessions, logins, vault, locks
//! and throttle) takes a [`RedisConn`] and sends commands through `redis::aio::ConnectionLike`,
//! so it works unchanged on a cluster. What a cluster asks of the callers:
//! - every Lua script, `MULTI` and pipeline touches keys of ONE hash slot (the cluster client
//!   refuses a cross-slot pipeline before sending it): keys used together share a hash tag, and
//!   independent writes to different slots are sent as separate commands (concurrently, so they
//!   still cost about one round trip on the multiplexed connection);
//! - `SCAN` covers one node: see the service's `RedisHandle::scan_keys`, which walks every master.

use redis::{
    aio::{ConnectionLike, ConnectionManager, MultiplexedConnection},
    cluster_async::ClusterConnection,
    Cmd, Pipeline, RedisFuture, Value,
};

/// A cheap-to-clone handle on a multiplexed Redis connection.
#[derive(Clone)]
pub enum RedisConn {
    /// One node, reconnecting by itself.
    Node(ConnectionManager),
    /// One node, no reconnection: a dedicated connection (a blocking read's).
    Dedicated(MultiplexedConnection),
    /// A Redis Cluster: commands are routed by hash slot and follow `MOVED`/failovers.
    Cluster(ClusterConnection),
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Node(_) => "RedisConn::Node",
            Self::Dedicated(_) => "RedisConn::Dedicated",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(c: ConnectionManager) -> Self {
        Self::Node(c)
    }
}

impl From<MultiplexedConnection> for RedisConn {
    fn from(c: MultiplexedConnection) -> Self {
        Self::Dedicated(c)
    }
}

impl From<ClusterConnection> for RedisConn {
    fn from(c: ClusterConnection) -> Self {
        Self::Cluster(c)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Dedicated(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Dedicated(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
