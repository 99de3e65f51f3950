//! The warm lane of `/api/chat/*`, in front of the router: a request whose caller is known
//! without the session layer — a Bearer identity JWT, or a session cookie this replica's copy
//! serves as it is (`session::auth::authenticate_from_copy`) — is forwarded from here. Anything
//! else (a cold or unknown session, no credentials, a refused path, another method, any other
//! route) goes on to the router, which answers it exactly as if the lane were not there.
//!
//! Why: the router's per-request machinery (route lookup, the boxed route stack, tower-sessions'
//! cookie jar and `Session`) cost ~16 % of a warm proxied request's CPU (issue 12).

use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    extract::{ConnectInfo, Request},
    http::{header, request::Parts, Uri},
    response::{IntoResponse, Response},
};
use futures_util::future::Either;
use tower::{util::Oneshot, Layer, Service, ServiceExt};

use super::{path, As, Proxy};
use crate::session::{authenticate, authenticate_from_copy, CsrfRule, UserInfo};

/// Puts [`ChatLane`] in front of a router.
#[derive(Clone)]
pub struct ChatLaneLayer {
    proxy: Arc<Proxy>,
    cookie_name: Arc<str>,
    peer: Option<SocketAddr>,
}

impl ChatLaneLayer {
    pub fn new(proxy: Arc<Proxy>, cookie_name: &str) -> Self {
        Self {
            proxy,
            cookie_name: cookie_name.into(),
            peer: None,
        }
    }

    /// The lane of one connection from `peer`: requests carry no `ConnectInfo` to it, and it
    /// puts one on each request it hands to the router.
    pub fn for_peer(&self, peer: SocketAddr) -> Self {
        Self {
            peer: Some(peer),
            ..self.clone()
        }
    }
}

impl<S> Layer<S> for ChatLaneLayer {
    type Service = ChatLane<S>;

    fn layer(&self, rest: S) -> ChatLane<S> {
        ChatLane {
            proxy: self.proxy.clone(),
            cookie_name: self.cookie_name.clone(),
            peer: self.peer,
            rest,
        }
    }
}

#[derive(Clone)]
pub struct ChatLane<S> {
    proxy: Arc<Proxy>,
    cookie_name: Arc<str>,
    /// The connection's peer (see [`ChatLaneLayer::for_peer`]); `None`: requests carry
    /// `ConnectInfo` themselves.
    peer: Option<SocketAddr>,
    /// The router: everything the lane does not take.
    rest: S,
}

type Forwarding = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for ChatLane<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future =
        Either<Either<Forwarding, Ready<Result<Response, Infallible>>>, Oneshot<S, Request>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is reached through `oneshot`, which waits for it to be ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match self.take(req) {
            Taken::Forward(f) => Either::Left(Either::Left(f)),
            Taken::Refused(res) => Either::Left(Either::Right(ready(Ok(res)))),
            Taken::ForTheRouter(mut req) => {
                if let Some(peer) = self.peer {
                    req.extensions_mut().insert(ConnectInfo(peer));
                }
                Either::Right(self.rest.clone().oneshot(req))
            }
        }
    }
}

enum Taken {
    Forward(Forwarding),
    /// The caller's copy serves, but the request fails its CSRF check.
    Refused(Response),
    ForTheRouter(Request),
}

impl<S> ChatLane<S> {
    /// The lane's answer to `req`, or `req` back for the router.
    fn take(&self, req: Request) -> Taken {
        let Some(uri) = self.upstream_uri(&req) else {
            return Taken::ForTheRouter(req);
        };
        let (parts, body) = req.into_parts();
        let proxy = self.proxy.clone();
        let peer = self.peer;
        if parts.headers.contains_key(header::AUTHORIZATION) {
            // Bearer never touches the session layer; its answers (401 included) are the same
            // as the router's.
            return Taken::Forward(Box::pin(async move {
                Ok(match authenticate(&proxy.auth, &parts, true).await {
                    Ok(caller) => forward(&proxy, peer, parts, body, uri, &caller.user).await,
                    Err(e) => e.into_response(),
                })
            }));
        }
        match authenticate_from_copy(&proxy.auth, &parts, &self.cookie_name, CsrfRule::Header) {
            None => Taken::ForTheRouter(Request::from_parts(parts, body)),
            Some(Err(e)) => Taken::Refused(e.into_response()),
            Some(Ok(session)) => Taken::Forward(Box::pin(async move {
                Ok(forward(&proxy, peer, parts, body, uri, &session.user).await)
            })),
        }
    }

    /// LibreChat's URI for a proxied method on `/api/chat/{rest}` with an allowed `rest`; `None`
    /// for anything the router must answer (it refuses the same way it always has).
    fn upstream_uri(&self, req: &Request) -> Option<Uri> {
        if !super::forwards(req.method()) {
            return None;
        }
        let upstream = &self.proxy.upstream;
        let rest = path::checked_rest(req.uri().path(), &upstream.deny_prefixes).ok()?;
        // The router's `{*path}` needs at least one character.
        if rest.is_empty() {
            return None;
        }
        upstream.uri(rest, req.uri().query()).ok()
    }
}

async fn forward(
    proxy: &Proxy,
    peer: Option<SocketAddr>,
    parts: Parts,
    body: axum::body::Body,
    uri: Uri,
    user: &UserInfo,
) -> Response {
    let peer = match peer {
        Some(peer) => peer.ip(),
        None => match crate::end_user::peer(&parts) {
            Ok(peer) => peer,
            Err(e) => return e.into_response(),
        },
    };
    match proxy
        .send_from(peer, parts, body, uri, As::User(user))
        .await
    {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}
