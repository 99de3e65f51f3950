//! Following a pub/sub channel for as long as the process runs: how in-process caches learn what
//! other replicas revoked (LibreChat logins, ended sessions).
//!
//! A subscription can drop (Redis restarts, failover, a cluster node leaving): whatever is
//! published while it is down is lost. So the follower says when it starts following
//! (`on_gap(true)`, at every (re)subscription: drop everything the missed messages would have
//! invalidated) and when it stops (`on_gap(false)`, the moment the subscription drops: a cache
//! that must not serve while a message could be missed drops everything then too).

use std::time::Duration;

use futures_util::StreamExt;

use super::RedisHandle;

/// Subscribes to `channel` (resubscribing with back-off after any failure) and hands every
/// message's payload to `on_message`; `on_gap` gets whether the channel is followed from now on;
/// `what` names the follower in the one warning it logs while Redis cannot be reached.
pub fn follow_channel(
    redis: RedisHandle,
    channel: String,
    what: &'static str,
    on_gap: impl Fn(bool) + Send + 'static,
    on_message: impl Fn(String) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut pause = Duration::from_millis(200);
        let mut warned = false;
        loop {
            let subscribed = async {
                // On a cluster: a connection to any one node (see redis_conn::cluster).
                let mut pubsub = redis.pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            }
            .await;
            match subscribed {
                Ok(pubsub) => {
                    // Whatever was published before this subscription is unknown.
                    on_gap(true);
                    pause = Duration::from_millis(200);
                    warned = false;
                    let mut messages = pubsub.into_on_message();
                    while let Some(msg) = messages.next().await {
                        on_message(msg.get_payload().unwrap_or_default());
                    }
                    on_gap(false);
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot follow {what}; retrying");
                        warned = true;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    })
}
