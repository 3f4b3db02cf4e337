//! End-to-end check of the generated stubs over a real HTTP/2 connection: a toy Ranker and
//! the Echo baseline served in-process, called through the generated clients, with the
//! error contract (reason and field metadata, batch entry errors) crossing the wire.

use api::fairrank::bench::v1::echo_client::EchoClient;
use api::fairrank::bench::v1::echo_server::{Echo, EchoServer};
use api::fairrank::bench::v1::{EchoRequest, EchoResponse};
use api::fairrank::v1::rank_batch_result::Outcome;
use api::fairrank::v1::rank_request::User;
use api::fairrank::v1::ranker_client::RankerClient;
use api::fairrank::v1::ranker_server::{Ranker, RankerServer};
use api::fairrank::v1::{
    ErrorReason, RankBatchRequest, RankBatchResponse, RankBatchResult, RankRequest, RankResponse,
    RankedItem, ScoreKind,
};
use api::status::{error_field, error_reason, error_status};
use prost::bytes::Bytes;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

/// Ranks candidates in request order with score = -position; rejects k = 0 the way the
/// real server documents it.
#[derive(Debug, Default)]
struct ToyRanker;

fn toy_rank(request: &RankRequest) -> Result<RankResponse, Status> {
    if request.k == 0 {
        return Err(error_status(
            Code::InvalidArgument,
            "k must be at least 1",
            ErrorReason::InvalidField,
            Some("k"),
        ));
    }
    let items = request
        .candidate_ids
        .iter()
        .take(request.k as usize)
        .enumerate()
        .map(|(position, id)| RankedItem {
            item_id: id.clone(),
            rank: position as u32 + 1,
            score: Some(-(position as f32)),
            unconstrained_rank: position as u32 + 1,
            ..Default::default()
        })
        .collect();
    Ok(RankResponse {
        request_id: request.request_id.clone(),
        items,
        score_kind: ScoreKind::DotProduct as i32,
        personalized: true,
        ..Default::default()
    })
}

#[tonic::async_trait]
impl Ranker for ToyRanker {
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        toy_rank(request.get_ref()).map(Response::new)
    }

    async fn rank_batch(
        &self,
        request: Request<RankBatchRequest>,
    ) -> Result<Response<RankBatchResponse>, Status> {
        let results = request
            .get_ref()
            .requests
            .iter()
            .map(|entry| RankBatchResult {
                outcome: Some(match toy_rank(entry) {
                    Ok(response) => Outcome::Response(response),
                    Err(status) => Outcome::Error((&status).into()),
                }),
            })
            .collect();
        Ok(Response::new(RankBatchResponse {
            results,
            timings: None,
        }))
    }
}

/// The transport-floor baseline as the bench server implements it.
#[derive(Debug, Default)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let request = request.into_inner();
        let payload = match request.response_bytes {
            Some(size) if size > 4 << 20 => {
                return Err(Status::invalid_argument("response_bytes exceeds 4 MiB"));
            }
            Some(size) => Bytes::from(vec![0; size as usize]),
            None => request.payload,
        };
        Ok(Response::new(EchoResponse { payload }))
    }
}

async fn serve() -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(RankerServer::new(ToyRanker))
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn request(id: &str, k: u32) -> RankRequest {
    RankRequest {
        request_id: id.into(),
        user: Some(User::UserId("user-1".into())),
        candidate_ids: vec!["a".into(), "b".into(), "c".into()],
        k,
        ..Default::default()
    }
}

#[tokio::test]
async fn rank_answers_and_errors_cross_the_wire() {
    let channel = serve().await;
    let mut ranker = RankerClient::new(channel.clone());

    let answer = ranker.rank(request("r-1", 2)).await.unwrap().into_inner();
    assert_eq!(answer.request_id, "r-1");
    let ids: Vec<&str> = answer
        .items
        .iter()
        .map(|item| item.item_id.as_str())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(answer.items[1].rank, 2);
    assert_eq!(answer.score_kind(), ScoreKind::DotProduct);

    let error = ranker.rank(request("r-2", 0)).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert_eq!(error_reason(&error), ErrorReason::InvalidField);
    assert_eq!(error_field(&error), Some("k"));

    let batch = RankBatchRequest {
        requests: vec![request("b-1", 1), request("b-2", 0)],
    };
    let results = ranker.rank_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 2);
    let Some(Outcome::Response(first)) = &results[0].outcome else {
        panic!("first entry should succeed: {:?}", results[0]);
    };
    assert_eq!(first.items.len(), 1);
    let Some(Outcome::Error(second)) = &results[1].outcome else {
        panic!("second entry should fail: {:?}", results[1]);
    };
    assert_eq!(second.code, Code::InvalidArgument as i32);
    assert_eq!(second.reason(), ErrorReason::InvalidField);
    assert_eq!(second.field, "k");
}

#[tokio::test]
async fn echo_returns_the_payload_or_the_requested_size() {
    let mut echo = EchoClient::new(serve().await);
    let payload = Bytes::from_static(b"transport floor");
    let answer = echo
        .echo(EchoRequest {
            payload: payload.clone(),
            response_bytes: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.payload, payload);

    let sized = echo
        .echo(EchoRequest {
            payload,
            response_bytes: Some(1000),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sized.payload.len(), 1000);
}
