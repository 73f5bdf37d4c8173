//! HTTP integration (feature `http`): the cluster context in plain axum or
//! tower HTTP handlers.
//!
//! [`ClusterContextLayer`] makes [`crate::context::runner_id`],
//! [`crate::context::is_leader`] and [`crate::context::trace`] answer in
//! every handler behind it (the shard is `None`: no entity runs there). An
//! incoming W3C `traceparent` header is continued: calls made from the
//! handler belong to the HTTP client's trace.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use flotilla::prelude::*;
//!
//! async fn whoami() -> String {
//!     format!(
//!         "runner {:?}, leader {:?}",
//!         flotilla::context::runner_id(),
//!         flotilla::context::is_leader()
//!     )
//! }
//!
//! # async fn run(cluster: Cluster) {
//! let app: Router = Router::new()
//!     .route("/whoami", get(whoami))
//!     .layer(flotilla::http::ClusterContextLayer::new(cluster.clone()));
//! # }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use crate::cluster::Cluster;
use crate::context::{self, ClusterContext, LeaderStatus, TRACEPARENT_HEADER, TraceContext};
use crate::sharding::RunnerId;
use crate::snowflake::SnowflakeGenerator;

/// A tower [`Layer`] that sets the cluster context around each request.
#[derive(Debug, Clone)]
pub struct ClusterContextLayer {
    runner: RunnerId,
    leader: Arc<LeaderStatus>,
    ids: Arc<SnowflakeGenerator>,
}

impl ClusterContextLayer {
    /// A layer for the handlers of `cluster`'s runner.
    pub fn new(cluster: Cluster) -> Self {
        let svc = cluster.services();
        Self {
            runner: svc.runner.clone(),
            leader: svc.leader.clone(),
            ids: svc.ids.clone(),
        }
    }

    /// The context of one request with `traceparent` (if any).
    fn context(&self, traceparent: Option<&str>) -> ClusterContext {
        let trace = traceparent
            .and_then(|value| value.parse::<context::TraceParent>().ok())
            .map_or_else(TraceContext::root, |parent| TraceContext::child_of(&parent));
        ClusterContext::new(
            self.runner.clone(),
            None,
            self.leader.clone(),
            self.ids.clone(),
            trace,
            None,
        )
    }
}

impl<S> Layer<S> for ClusterContextLayer {
    type Service = ClusterContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClusterContextService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ClusterContextLayer`] wraps around a handler.
#[derive(Debug, Clone)]
pub struct ClusterContextService<S> {
    inner: S,
    layer: ClusterContextLayer,
}

impl<S, B> Service<Request<B>> for ClusterContextService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<ClusterContext, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let traceparent = request
            .headers()
            .get(TRACEPARENT_HEADER)
            .and_then(|value| value.to_str().ok());
        let current = self.layer.context(traceparent);
        let inner = &mut self.inner;
        let future = context::sync_scoped(current.clone(), || inner.call(request));
        context::scoped(current, future)
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    async fn facts() -> String {
        format!(
            "{:?}|{:?}|{:?}|{:?}",
            context::runner_id().map(|r| r.to_string()),
            context::shard_id(),
            context::is_leader(),
            context::trace().map(|t| (t.trace_id().to_string(), t.parent_span_id()))
        )
    }

    async fn body(response: axum::response::Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn plain_http_handlers_see_the_runner_and_the_leader_status() {
        let cluster = Cluster::builder().memory().start().await.unwrap();
        let app = Router::new()
            .route("/", get(facts))
            .layer(ClusterContextLayer::new(cluster.clone()));
        let request = || Request::builder().uri("/").body(Body::empty()).unwrap();

        // A single runner leads.
        let seen = body(app.clone().oneshot(request()).await.unwrap()).await;
        let runner = format!(
            "Some({:?})|None|Some(true)|Some(",
            cluster.runner_id().to_string()
        );
        assert!(seen.starts_with(&runner), "{seen}");

        // When leadership moves, handlers see it live.
        cluster.services().leader.set(false);
        let seen = body(app.clone().oneshot(request()).await.unwrap()).await;
        assert!(seen.contains("|None|Some(false)|"), "{seen}");

        // An incoming traceparent is continued.
        let traced = Request::builder()
            .uri("/")
            .header(
                TRACEPARENT_HEADER,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Body::empty())
            .unwrap();
        let seen = body(app.clone().oneshot(traced).await.unwrap()).await;
        assert!(
            seen.ends_with(
                "Some((\"4bf92f3577b34da6a3ce929d0e0e4736\", Some(SpanId(00f067aa0ba902b7))))"
            ),
            "{seen}"
        );

        // Without the layer: nothing, and no panic.
        let bare = Router::new().route("/", get(facts));
        let seen = body(bare.oneshot(request()).await.unwrap()).await;
        assert_eq!(seen, "None|None|None|None");
        cluster.shutdown().await;
    }
}
