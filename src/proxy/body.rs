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

/// Ends the body with an error when no frame arrives for `idle`.
pub struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
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
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(this.idle))))),
                Poll::Pending => Poll::Pending,
            },
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
