//! Unary gRPC routes whose undecodable request bodies are INVALID_ARGUMENT: a prost codec,
//! the route helper and the service wrapper ([`Routes`]) shared by the `Ranker` and `Admin`
//! services (`Rank` and `RankBatch` bring their own codecs).
//!
//! tonic's generated servers decode with its prost codec, which answers a body that is not
//! a valid message (a string that is not UTF-8, a truncated field) with INTERNAL. Those
//! bytes are the client's input, so these routes answer INVALID_ARGUMENT with prost's
//! message, which names the field ([`errors::undecodable_request`]), and otherwise serve
//! exactly as the generated server: same method, same message size limit. A body above
//! that limit is RESOURCE_EXHAUSTED, as gRPC's own implementations answer it (tonic says
//! OUT_OF_RANGE). Every call refused before its handler runs is handed to the route's
//! `refused` callback, which counts it.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::Arc;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Context, Poll, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};

use super::errors;

/// prost's encoding both ways, `Request` in and `Response` out; a request that does not
/// decode is [`errors::undecodable_request`].
pub struct ProstRouteCodec<Request, Response>(PhantomData<fn(Request) -> Response>);

impl<Request, Response> Default for ProstRouteCodec<Request, Response> {
    fn default() -> Self {
        ProstRouteCodec(PhantomData)
    }
}

/// Writes the answers of a [`ProstRouteCodec`].
pub struct ResponseEncoder<Response>(PhantomData<fn(Response)>);

/// Reads the requests of a [`ProstRouteCodec`].
pub struct RequestDecoder<Request>(PhantomData<fn() -> Request>);

impl<Request, Response> Codec for ProstRouteCodec<Request, Response>
where
    Request: Message + Default + Send + 'static,
    Response: Message + Send + 'static,
{
    type Encode = Response;
    type Decode = Request;
    type Encoder = ResponseEncoder<Response>;
    type Decoder = RequestDecoder<Request>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

impl<Response: Message> Encoder for ResponseEncoder<Response> {
    type Item = Response;
    type Error = Status;

    fn encode(&mut self, item: Response, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The buffer grows as needed, so this cannot run out of space.
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|error| errors::internal(format!("encoding the answer: {error}")))
    }
}

impl<Request: Message + Default> Decoder for RequestDecoder<Request> {
    type Item = Request;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Request>, Status> {
        Request::decode(buf)
            .map(Some)
            .map_err(|error| errors::undecodable_request(&error))
    }
}

/// A unary method as a closure from the decoded request to its answer; `called` is set
/// when tonic hands it a request (the body decoded within the size limit).
struct MethodFn<'a, F> {
    method: F,
    called: &'a mut bool,
}

impl<Request, Response, F> UnaryService<Request> for MethodFn<'_, F>
where
    F: FnMut(tonic::Request<Request>) -> BoxFuture<tonic::Response<Response>, Status>,
{
    type Response = Response;
    type Future = BoxFuture<tonic::Response<Response>, Status>;

    fn call(&mut self, request: tonic::Request<Request>) -> Self::Future {
        *self.called = true;
        (self.method)(request)
    }
}

/// Serves `request` as a unary call of `method` with [`ProstRouteCodec`], `max_message_bytes`
/// limiting the request (the Admin service's routes: its answers are the server's own, and
/// GetStatus carries the whole configuration, so they are not held to a limit meant for
/// clients' messages); `refused` sees the status of a call refused before `method` ran
/// ([`unary_with_codec`]).
pub fn unary<Request, Response, B, F, R>(
    request: http::Request<B>,
    max_message_bytes: usize,
    method: F,
    refused: R,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
where
    Request: Message + Default + Send + 'static,
    Response: Message + Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    F: FnMut(tonic::Request<Request>) -> BoxFuture<tonic::Response<Response>, Status>
        + Send
        + 'static,
    R: FnOnce(&Status) + Send + 'static,
{
    let codec = ProstRouteCodec::<Request, Response>::default();
    unary_with_codec(codec, request, max_message_bytes, None, method, refused)
}

/// [`unary`] with `codec` instead of [`ProstRouteCodec`] (the `Ranker` routes' own codecs),
/// and answers limited to `max_answer_bytes` (the handlers refuse larger answers themselves,
/// so that the refusal is counted and says what to change; the limit only guards them).
///
/// A call refused before `method` runs (a body above `max_message_bytes`, one that does not
/// decode, or no message at all) is answered by tonic; `refused` is then called with the
/// status the client receives, after a body above the limit has become
/// [`errors::request_too_large`].
pub fn unary_with_codec<C, B, F, R>(
    codec: C,
    request: http::Request<B>,
    max_message_bytes: usize,
    max_answer_bytes: Option<usize>,
    method: F,
    refused: R,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
where
    C: Codec + Send + 'static,
    C::Encode: Send + 'static,
    C::Decode: Send + 'static,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    F: FnMut(tonic::Request<C::Decode>) -> BoxFuture<tonic::Response<C::Encode>, Status>
        + Send
        + 'static,
    R: FnOnce(&Status) + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(codec)
            .apply_max_message_size_config(Some(max_message_bytes), max_answer_bytes);
        let mut called = false;
        let method = MethodFn {
            method,
            called: &mut called,
        };
        let answer = grpc.unary(method, request).await;
        if called {
            return Ok(answer);
        }
        Ok(refusal_answer(answer, max_message_bytes, refused))
    })
}

/// The answer to a call refused before its handler ran, `answer` as tonic made it: a body
/// above `limit` becomes [`errors::request_too_large`] (RESOURCE_EXHAUSTED, as grpc-go,
/// grpc-java and gRPC core answer a message above the receiver's limit; tonic's
/// OUT_OF_RANGE reads as a bad field value); any other refusal is kept. `refused` sees the
/// status sent.
fn refusal_answer(
    answer: http::Response<tonic::body::Body>,
    limit: usize,
    refused: impl FnOnce(&Status),
) -> http::Response<tonic::body::Body> {
    // tonic keeps the status of an answer it makes from one in the answer's extensions.
    let Some(status) = answer.extensions().get::<Status>() else {
        return answer;
    };
    let Some((size, _)) = errors::tonic_too_large(status) else {
        refused(status);
        return answer;
    };
    let status = errors::request_too_large(size, limit);
    refused(&status);
    errors::status_answer(status)
}

/// A service that serves its methods through its own routes ([`unary`],
/// [`unary_with_codec`]) inside a [`Routes`].
pub trait OwnRoutes: Send + Sync + 'static {
    /// The route serving `request`'s method, or the request back when the generated server
    /// answers it (an unknown method). The `Err` side is that hand-back, not a failure; it
    /// moves the request as tonic passed it (boxing it would allocate on every such call).
    #[allow(clippy::result_large_err)]
    fn route<B>(
        service: &Arc<Self>,
        request: http::Request<B>,
        max_message_bytes: usize,
    ) -> Result<BoxFuture<http::Response<tonic::body::Body>, Infallible>, http::Request<B>>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static;
}

/// A gRPC service as tonic serves it: `service`'s own routes ([`OwnRoutes`]) first, then
/// its generated server `generated` (tonic's `*Server`, which names the service and answers
/// unknown methods).
#[derive(Debug, Clone)]
pub struct Routes<S, G> {
    generated: G,
    service: Arc<S>,
    max_message_bytes: usize,
}

impl<S, G> Routes<S, G> {
    /// Routes over `service`; `generated` serves the same service with `max_message_bytes`
    /// as its decoding limit, which the own routes use too.
    pub fn from_parts(service: Arc<S>, generated: G, max_message_bytes: usize) -> Self {
        Routes {
            generated,
            service,
            max_message_bytes,
        }
    }
}

impl<S, G: NamedService> NamedService for Routes<S, G> {
    const NAME: &'static str = G::NAME;
}

impl<S, G, B> Service<http::Request<B>> for Routes<S, G>
where
    S: OwnRoutes,
    G: Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future = BoxFuture<http::Response<tonic::body::Body>, Infallible>,
        >,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match S::route(&self.service, request, self.max_message_bytes) {
            Ok(route) => route,
            Err(request) => self.generated.call(request),
        }
    }
}
