//! The `fairrank.bench.v1.Echo` service: the transport-floor baseline of the load generator.
//! It copies bytes and nothing else (no admission control, no engine), so the difference to
//! `Ranker.Rank` at the same message sizes is what ranking costs.

use std::sync::Arc;
use std::time::Instant;

use api::fairrank::bench::v1 as bench;
use prost::bytes::Bytes;
use tonic::{Request, Response, Status};

use super::{Shared, errors};

/// Largest `response_bytes` an Echo call may ask for (4 MiB, as the proto says).
pub const MAX_RESPONSE_BYTES: u32 = 4 * 1024 * 1024;

/// Zero bytes that sized answers are sliced from, so an Echo call allocates nothing.
static ZEROS: [u8; MAX_RESPONSE_BYTES as usize] = [0; MAX_RESPONSE_BYTES as usize];

/// The Echo service.
#[derive(Debug, Clone)]
pub struct EchoService {
    shared: Arc<Shared>,
}

impl EchoService {
    /// The service over the shared server state (for its metrics).
    pub fn new(shared: Arc<Shared>) -> EchoService {
        EchoService { shared }
    }
}

/// The answer to one Echo request, whose encoding may be at most `max_message_bytes`
/// (`server.max_message_bytes`). An echoed payload is never longer than its request, which
/// the transport held to that limit; a sized answer above it is refused here, as tonic's
/// encoder would refuse it (OUT_OF_RANGE, in the trailers, without a reason).
fn echo_payload(request: bench::EchoRequest, max_message_bytes: usize) -> Result<Bytes, Status> {
    match request.response_bytes {
        None => Ok(request.payload),
        Some(size) if size > MAX_RESPONSE_BYTES => Err(errors::limit_exceeded(
            "response_bytes",
            format!("{size} exceeds the limit of {MAX_RESPONSE_BYTES}"),
        )),
        Some(size) => {
            let payload = Bytes::from_static(&ZEROS[..size as usize]);
            let answer = prost::Message::encoded_len(&bench::EchoResponse {
                payload: payload.clone(),
            });
            if answer > max_message_bytes {
                return Err(errors::limit_exceeded(
                    "response_bytes",
                    format!(
                        "{size} zero bytes encode to an answer of {answer} bytes, above the \
                         server's limit of {max_message_bytes} (`server.max_message_bytes`)"
                    ),
                ));
            }
            Ok(payload)
        }
    }
}

#[tonic::async_trait]
impl bench::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        request: Request<bench::EchoRequest>,
    ) -> Result<Response<bench::EchoResponse>, Status> {
        let started = Instant::now();
        let result = echo_payload(request.into_inner(), self.shared.max_message_bytes);
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.shared
            .metrics
            .record_call("Echo", code, started.elapsed());
        result.map(|payload| Response::new(bench::EchoResponse { payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default `server.max_message_bytes`.
    const LIMIT: usize = 16 << 20;

    #[test]
    fn payloads_are_echoed_or_sized() {
        let payload = Bytes::from_static(b"abc");
        let echoed = echo_payload(
            bench::EchoRequest {
                payload: payload.clone(),
                response_bytes: None,
            },
            LIMIT,
        )
        .unwrap();
        assert_eq!(echoed, payload);
        let sized = echo_payload(
            bench::EchoRequest {
                payload,
                response_bytes: Some(10),
            },
            LIMIT,
        )
        .unwrap();
        assert_eq!(sized.len(), 10);
        assert!(sized.iter().all(|&byte| byte == 0));
        let status = echo_payload(
            bench::EchoRequest {
                payload: Bytes::new(),
                response_bytes: Some(MAX_RESPONSE_BYTES + 1),
            },
            LIMIT,
        )
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(api::status::error_field(&status), Some("response_bytes"));
    }

    /// A sized answer whose encoding is above the message limit is refused with a reason
    /// (tonic's encoder would end the call with OUT_OF_RANGE and none); one at the limit
    /// passes.
    #[test]
    fn sized_answers_above_the_message_limit_are_refused() {
        let sized = |size: u32, limit: usize| {
            echo_payload(
                bench::EchoRequest {
                    payload: Bytes::new(),
                    response_bytes: Some(size),
                },
                limit,
            )
        };
        // 1000 bytes encode to 1003: the field's tag and a two-byte length.
        assert_eq!(sized(1000, 1003).unwrap().len(), 1000);
        let status = sized(1000, 1002).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            api::status::error_reason(&status),
            api::fairrank::v1::ErrorReason::LimitExceeded
        );
        assert_eq!(api::status::error_field(&status), Some("response_bytes"));
        assert!(status.message().contains("1003 bytes"), "{status:?}");
    }
}
