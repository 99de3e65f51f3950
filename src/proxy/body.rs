//! Streaming body helpers: an idle timeout for long-lived responses (SSE) that would otherwise
//! hold a connection forever once LibreChat stops sending, and the guard around the client's
//! request body (size cap, idle timeout, and a record of why it failed).

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

#[derive(Debug, thiserror::Error)]
#[error("upstream body sent nothing for {0:?}")]
pub struct IdleTimeout(Duration);

/// Ends the body with an error when LibreChat sends nothing for `idle` while the body is being
/// read. The clock starts when the body first has to wait, and restarts at each wait after a
/// frame: a response that is all there when read (most JSON answers) never arms a timer, and a
/// client slow to read does not use up LibreChat's time.
pub struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was last armed.
    moved: bool,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            moved: false,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.moved = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if this.moved {
                            timer.as_mut().reset(Instant::now() + idle);
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(idle))),
                };
                this.moved = false;
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why the client's request body ended early, as [`ClientBody`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// More than `librechat.max_request_body_bytes` (a chunked body; a declared length over the
    /// cap is refused before anything is sent).
    TooLarge,
    /// Broken chunked encoding, a body cut short, or the client's connection failing.
    Malformed,
    /// Nothing arrived for `server.request_body_idle_timeout_secs`.
    Idle,
}

/// Shared record of a [`ClientBody`]'s failure, read by the proxy when the upstream request fails
/// so the client gets 413/400/408 instead of a 502.
#[derive(Debug, Clone, Default)]
pub struct BodyOutcome(Arc<OnceLock<BodyFailure>>);

impl BodyOutcome {
    pub fn failure(&self) -> Option<BodyFailure> {
        self.0.get().copied()
    }

    fn record(&self, failure: BodyFailure) {
        // The first failure is the cause; later ones are consequences.
        let _ = self.0.set(failure);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    #[error("the request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("the request body sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the request body could not be read: {0}")]
    Malformed(#[source] BoxError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body on its way to LibreChat: counts bytes against the cap, ends with an
/// error after `idle` without a frame, and records why it failed in a [`BodyOutcome`]. An error
/// makes hyper's client abort the upstream request (no terminating chunk, connection closed), so
/// LibreChat never takes a cut body for a complete one.
pub struct ClientBody<B> {
    inner: B,
    limit: u64,
    seen: u64,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    outcome: BodyOutcome,
    failed: bool,
}

impl<B> ClientBody<B> {
    pub fn new(inner: B, limit: u64, idle: Duration) -> Self {
        Self {
            inner,
            limit,
            seen: 0,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            outcome: BodyOutcome::default(),
            failed: false,
        }
    }

    pub fn outcome(&self) -> BodyOutcome {
        self.outcome.clone()
    }

    fn fail(
        &mut self,
        failure: BodyFailure,
        error: ClientBodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        self.failed = true;
        self.outcome.record(failure);
        Poll::Ready(Some(Err(error)))
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.limit {
                        let limit = this.limit;
                        return this.fail(BodyFailure::TooLarge, ClientBodyError::TooLarge(limit));
                    }
                }
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail(BodyFailure::Malformed, ClientBodyError::Malformed(e.into()))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let idle = this.idle;
                    this.fail(BodyFailure::Idle, ClientBodyError::Idle(idle))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{IdleTimeout, IdleTimeoutBody};
    use axum::body::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use std::{convert::Infallible, time::Duration};
    use tokio::{sync::mpsc, time::Instant};

    fn channel_body(
        idle: Duration,
    ) -> (
        mpsc::Sender<&'static str>,
        IdleTimeoutBody<impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin>,
    ) {
        let (tx, rx) = mpsc::channel::<&'static str>(8);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(chunk.as_bytes()))),
                rx,
            ))
        });
        (
            tx,
            IdleTimeoutBody::new(StreamBody::new(Box::pin(frames)), idle),
        )
    }

    async fn next_data<B>(body: &mut B) -> Bytes
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Debug,
    {
        body.frame()
            .await
            .expect("a frame")
            .expect("not an error")
            .into_data()
            .expect("data")
    }

    #[tokio::test]
    async fn the_idle_clock_runs_only_while_the_body_waits_for_librechat() {
        let idle = Duration::from_millis(200);
        let (tx, mut body) = channel_body(idle);
        tx.send("a").await.expect("send");
        // A client slow to read: longer than the idle timeout, while LibreChat's frame waits.
        tokio::time::sleep(idle * 2).await;
        assert_eq!(next_data(&mut body).await, "a");
        assert!(body.timer.is_none(), "nothing waited yet: no timer armed");

        // Frames closer together than the timeout keep the body alive, however long it runs.
        let sender = tokio::spawn({
            let tx = tx.clone();
            async move {
                for chunk in ["b", "c", "d", "e", "f", "g", "h", "i"] {
                    tokio::time::sleep(idle / 4).await;
                    tx.send(chunk).await.expect("send");
                }
            }
        });
        for expected in ["b", "c", "d", "e", "f", "g", "h", "i"] {
            assert_eq!(next_data(&mut body).await, expected);
        }
        sender.await.expect("sender");

        // Then LibreChat goes quiet: the body ends with the idle error, `idle` after it waits.
        let waiting = Instant::now();
        let end = tokio::time::timeout(idle * 20, body.frame())
            .await
            .expect("the body ends")
            .expect("a last frame");
        let error = end.expect_err("an idle error");
        assert!(error.is::<IdleTimeout>(), "{error}");
        assert!(waiting.elapsed() >= idle, "{:?}", waiting.elapsed());
        drop(tx);
    }
}
