//! The server's front service: stamps every call with its deadline ([`deadline`]) and hands
//! it to the gRPC service its path names, or answers UNIMPLEMENTED; gives an error answer
//! that tonic made without a `fairrank-error-reason` one ([`errors::stamp_reason`]).
//!
//! tonic's `Router` does the same through an axum router and, with the deadline
//! interceptor, a tonic `InterceptorLayer`. Per call that cost a route lookup, a boxed
//! service clone, the request body boxed twice (tonic's body into axum's and back), the
//! path's parameters collected into allocated strings, and the request taken apart into
//! tonic's metadata and put back together. The front does the same job with a string
//! comparison per service and no allocation of its own, and answers exactly as that stack
//! did: the same deadline refusal and, for a path that names no service, tonic's
//! UNIMPLEMENTED answer (an empty body, `grpc-status: 12`).
//!
//! Every fairrank error carries a reason. The answers tonic makes itself before or instead
//! of a handler (a generated server's UNIMPLEMENTED for an unknown method, a compressed
//! body refused, a body that does not decode or is too large, `tonic-health`'s NOT_FOUND)
//! are trailers-only, their status in the headers: [`Stamped`] adds the reason there as the
//! answer passes, a header lookup per call and no allocation. Statuses that come in a
//! stream's trailers come from a reflection stream's requests and get theirs in
//! [`super::reflection`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::ready;
use std::time::Duration;

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

use super::{admin, deadline, errors, ranker};
use crate::metrics::Metrics;

/// A response as every service of the server answers.
type Answer = http::Response<Body>;

/// A service the front can hand calls to: tonic's generated servers and our `Routes`.
pub trait Served:
    Service<
        http::Request<Body>,
        Response = Answer,
        Error = Infallible,
        Future = BoxFuture<Answer, Infallible>,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Served for S where
    S: Service<
            http::Request<Body>,
            Response = Answer,
            Error = Infallible,
            Future = BoxFuture<Answer, Infallible>,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The services behind the front, one field per service (no dynamic dispatch).
#[derive(Debug)]
pub struct Services<Ranker, Echo, Admin, Health, ReflectionV1, ReflectionV1alpha> {
    /// `fairrank.v1.Ranker`, the hot path: looked up first.
    pub ranker: Ranker,
    /// `fairrank.bench.v1.Echo`.
    /// Served only with `server.echo_service`; otherwise its calls are UNIMPLEMENTED.
    pub echo: Option<Echo>,
    /// `fairrank.v1.Admin`.
    pub admin: Admin,
    /// `grpc.health.v1.Health`.
    pub health: Health,
    /// `grpc.reflection.v1.ServerReflection`.
    pub reflection_v1: ReflectionV1,
    /// `grpc.reflection.v1alpha.ServerReflection`.
    pub reflection_v1alpha: ReflectionV1alpha,
}

/// The front service (cheap to clone: hyper clones it for every call).
#[derive(Debug)]
pub struct Front<Ranker, Echo, Admin, Health, ReflectionV1, ReflectionV1alpha> {
    services: Arc<Services<Ranker, Echo, Admin, Health, ReflectionV1, ReflectionV1alpha>>,
    default_deadline: Duration,
    /// Counts the calls of counted methods refused here (their deadline had passed).
    metrics: Arc<Metrics>,
}

impl<R, E, A, H, V1, V1a> Clone for Front<R, E, A, H, V1, V1a> {
    fn clone(&self) -> Self {
        Front {
            services: Arc::clone(&self.services),
            default_deadline: self.default_deadline,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

impl<R, E, A, H, V1, V1a> Front<R, E, A, H, V1, V1a> {
    /// The front over `services`; calls without a valid `grpc-timeout` get
    /// `default_deadline`; calls refused here are counted in `metrics`.
    pub fn new(
        services: Services<R, E, A, H, V1, V1a>,
        default_deadline: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Front {
            services: Arc::new(services),
            default_deadline,
            metrics,
        }
    }
}

/// The service part of a gRPC path `/{service}/{method}` (the method must not be empty),
/// as tonic's router matched it.
fn service_name(path: &str) -> Option<&str> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!method.is_empty()).then_some(service)
}

/// Counts a call refused before any service saw it as its method's own refusals are
/// counted: a `Rank` or `RankBatch` call as a failed call and a rank error, an Admin call as
/// a failed call; other services' calls are not counted by method.
fn count_refusal(metrics: &Metrics, path: &str, status: &Status) {
    if let Some(method) = ranker::method_of(path) {
        ranker::refused_before_handler(metrics, method, status);
    } else if let Some(method) = admin::method_of(path) {
        metrics.record_call(method, status.code(), Duration::ZERO);
    }
}

/// Calls a clone of `service` (the generated servers' `call` needs `&mut`; a clone is a
/// reference count or two).
fn call<S: Served>(service: &S, request: http::Request<Body>) -> BoxFuture<Answer, Infallible> {
    service.clone().call(request)
}

/// tonic's answer to a path that names no service it serves (UNIMPLEMENTED with an empty
/// message), with the reason every fairrank error carries.
fn unimplemented() -> BoxFuture<Answer, Infallible> {
    Box::pin(std::future::ready(Ok(errors::status_answer(
        api::status::error_status(
            tonic::Code::Unimplemented,
            "",
            api::fairrank::v1::ErrorReason::NotSupported,
            None,
        ),
    ))))
}

/// A service's answer on its way out: an error answer with its status in the headers
/// (trailers-only) that carries no `fairrank-error-reason`, one tonic made itself, gets one
/// ([`errors::stamp_reason`]); tonic's OUT_OF_RANGE for a request message above the limit
/// (a health request) becomes the RESOURCE_EXHAUSTED every service answers
/// ([`errors::request_too_large`]).
pub struct Stamped(BoxFuture<Answer, Infallible>);

impl std::fmt::Debug for Stamped {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_tuple("Stamped").finish_non_exhaustive()
    }
}

impl Future for Stamped {
    type Output = Result<Answer, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Ok(mut answer) = ready!(self.0.as_mut().poll(cx));
        // tonic keeps the status of an answer it makes from one in the answer's extensions.
        let too_large = answer
            .extensions()
            .get::<Status>()
            .and_then(errors::tonic_too_large);
        if let Some((size, Some(limit))) = too_large {
            return Poll::Ready(Ok(errors::status_answer(errors::request_too_large(
                size, limit,
            ))));
        }
        errors::stamp_reason(answer.headers_mut());
        Poll::Ready(Ok(answer))
    }
}

impl<R, E, A, H, V1, V1a> Front<R, E, A, H, V1, V1a>
where
    R: Served,
    E: Served,
    A: Served,
    H: Served,
    V1: Served,
    V1a: Served,
{
    /// The answer to `request`, as the service its path names (or the front) makes it.
    fn route(&self, mut request: http::Request<Body>) -> BoxFuture<Answer, Infallible> {
        if let Err(status) = deadline::stamp(&mut request, self.default_deadline) {
            count_refusal(&self.metrics, request.uri().path(), &status);
            return Box::pin(std::future::ready(Ok(errors::status_answer(status))));
        }
        let services = &*self.services;
        let Some(name) = service_name(request.uri().path()) else {
            return unimplemented();
        };
        // Associated constants cannot be patterns of a generic type: compare in turn.
        if name == R::NAME {
            call(&services.ranker, request)
        } else if name == E::NAME {
            match &services.echo {
                Some(echo) => call(echo, request),
                None => unimplemented(),
            }
        } else if name == A::NAME {
            call(&services.admin, request)
        } else if name == H::NAME {
            call(&services.health, request)
        } else if name == V1::NAME {
            call(&services.reflection_v1, request)
        } else if name == V1a::NAME {
            call(&services.reflection_v1alpha, request)
        } else {
            unimplemented()
        }
    }
}

impl<R, E, A, H, V1, V1a> Service<http::Request<Body>> for Front<R, E, A, H, V1, V1a>
where
    R: Served,
    E: Served,
    A: Served,
    H: Served,
    V1: Served,
    V1a: Served,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Stamped;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Stamped {
        Stamped(self.route(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_method_for_the_ranker_and_admin() {
        let metrics = Metrics::new();
        let late = Status::deadline_exceeded("on arrival");
        for path in [
            "/fairrank.v1.Ranker/Rank",
            "/fairrank.v1.Ranker/RankBatch",
            "/fairrank.v1.Admin/GetStatus",
            "/fairrank.v1.Ranker/NoSuchMethod",
            "/grpc.health.v1.Health/Check",
        ] {
            count_refusal(&metrics, path, &late);
        }
        let text = metrics.render();
        for method in ["Rank", "RankBatch", "GetStatus"] {
            let line = format!(
                "fairrank_requests_total{{method=\"{method}\",code=\"DeadlineExceeded\"}} 1"
            );
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
        assert!(
            !text.contains("NoSuchMethod") && !text.contains("Check"),
            "{text}"
        );
    }

    #[test]
    fn service_names_are_taken_as_the_router_matched_them() {
        assert_eq!(
            service_name("/fairrank.v1.Ranker/Rank"),
            Some("fairrank.v1.Ranker")
        );
        assert_eq!(service_name("/a/b/c"), Some("a"));
        assert_eq!(service_name("/fairrank.v1.Ranker/"), None);
        assert_eq!(service_name("/fairrank.v1.Ranker"), None);
        assert_eq!(service_name("fairrank.v1.Ranker/Rank"), None);
        assert_eq!(service_name("/"), None);
        assert_eq!(service_name(""), None);
    }
}
