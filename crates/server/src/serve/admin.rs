//! The `fairrank.v1.Admin` service: table reloads and rollbacks, the personalization switch
//! and status. Every call needs `authorization: Bearer <token>`, compared in constant time.
//! Table changes run on the blocking pool (opening, validating and warming a table reads
//! the whole file) and are logged under the `fairrank::audit` target with their reason.
//! [`AdminRoutes`] serves it with a body that does not decode answered INVALID_ARGUMENT.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use api::fairrank::v1 as pb;
use api::fairrank::v1::admin_server::{Admin, AdminServer};
use engine::{ReloadOutcome, TableKind};
use subtle::ConstantTimeEq;
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::{Request, Response, Status};

use super::routes::{OwnRoutes, Routes};
use super::{Shared, convert, errors, routes};

/// Longest operator note, in bytes.
const MAX_REASON_BYTES: usize = 1024;

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    /// The service over the shared server state.
    pub fn new(shared: Arc<Shared>) -> AdminService {
        AdminService { shared }
    }

    /// Checks the bearer token.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.authorize_header(
            request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes()),
        )
    }

    /// [`AdminService::authorize`] on the raw `authorization` header: the routes check it
    /// before reading the body, so an unauthenticated caller never has one decoded.
    fn authorize_header(&self, header: Option<&[u8]>) -> Result<(), Status> {
        let Some(expected) = &self.shared.admin_token else {
            return Err(errors::admin_disabled(&self.shared.admin_token_env));
        };
        let Some(header) = header else {
            return Err(errors::unauthenticated(
                "admin calls need the metadata `authorization: Bearer <token>`",
            ));
        };
        let presented = std::str::from_utf8(header)
            .ok()
            .and_then(bearer_token)
            .ok_or_else(|| {
                errors::unauthenticated("the authorization metadata is not `Bearer <token>`")
            })?;
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(errors::unauthenticated("the admin token is not valid"))
        }
    }

    /// Runs an admin call: authorization, the call itself, metrics.
    async fn call<T, R, F>(
        &self,
        method: &'static str,
        request: Request<T>,
        body: impl FnOnce(T) -> F,
    ) -> Result<Response<R>, Status>
    where
        F: std::future::Future<Output = Result<R, Status>>,
    {
        let started = Instant::now();
        let result = match self.authorize(&request) {
            Ok(()) => body(request.into_inner()).await,
            Err(status) => {
                tracing::warn!(method, code = ?status.code(), "admin call refused");
                Err(status)
            }
        };
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.shared
            .metrics
            .record_call(method, code, started.elapsed());
        result.map(Response::new)
    }

    /// Runs a reload or rollback on the blocking pool and records its outcome.
    async fn change_table(
        &self,
        kind: TableKind,
        operation: &'static str,
        reason: String,
        change: impl FnOnce(&engine::Engine) -> Result<ReloadOutcome, engine::EngineError>
        + Send
        + 'static,
    ) -> Result<ReloadOutcome, Status> {
        let engine = self.shared.engine.clone();
        let label = convert::table_label(kind);
        let metrics = &self.shared.metrics;
        let outcome = tokio::task::spawn_blocking(move || change(&engine))
            .await
            .map_err(|error| errors::internal(format!("the {operation} task failed: {error}")));
        let outcome = match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => {
                metrics.record_table_change(label, operation, false);
                tracing::warn!(
                    table = label,
                    operation,
                    %error,
                    "table change failed; the old table keeps serving"
                );
                return Err(errors::engine_status(&error));
            }
            Err(status) => {
                metrics.record_table_change(label, operation, false);
                tracing::error!(
                    table = label,
                    operation,
                    message = status.message(),
                    "table change task failed"
                );
                return Err(status);
            }
        };
        metrics.record_table_change(label, operation, true);
        metrics.set_table(label, outcome.table.version.generation, outcome.table.rows);
        tracing::info!(
            target: "fairrank::audit",
            operation,
            table = label,
            generation = outcome.table.version.generation,
            checksum = format_args!("{:016x}", outcome.table.version.checksum),
            path = %outcome.table.path.display(),
            load_us = outcome.load_us,
            reason,
            "table changed"
        );
        Ok(outcome)
    }
}

/// The token of an `authorization` value `Bearer <token>` (scheme case-insensitive).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn check_reason(reason: &str) -> Result<(), Status> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(errors::limit_exceeded(
            "reason",
            format!(
                "is {} bytes long; at most {MAX_REASON_BYTES} are allowed",
                reason.len()
            ),
        ));
    }
    Ok(())
}

fn required_kind(kind: i32) -> Result<TableKind, Status> {
    convert::table_kind(kind).ok_or_else(|| {
        errors::invalid_field("table", "must be TABLE_KIND_ITEMS or TABLE_KIND_USERS")
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn reload_table(
        &self,
        request: Request<pb::ReloadTableRequest>,
    ) -> Result<Response<pb::ReloadTableResponse>, Status> {
        self.call("ReloadTable", request, |request| async move {
            let kind = required_kind(request.table)?;
            check_reason(&request.reason)?;
            let path = request
                .path
                .as_deref()
                .map(|path| self.shared.reload_dirs.resolve(kind, path))
                .transpose()?;
            let reload = engine::ReloadRequest {
                path,
                if_generation: request.if_generation,
                verify_checksum: request.verify_checksum,
            };
            let outcome = self
                .change_table(kind, "reload", request.reason, move |engine| {
                    engine.reload(kind, &reload)
                })
                .await?;
            Ok(pb::ReloadTableResponse {
                table: Some(convert::table_status(&outcome.table)),
                previous: outcome.previous.map(convert::table_version),
                load_us: outcome.load_us,
            })
        })
        .await
    }

    async fn rollback_table(
        &self,
        request: Request<pb::RollbackTableRequest>,
    ) -> Result<Response<pb::RollbackTableResponse>, Status> {
        self.call("RollbackTable", request, |request| async move {
            let kind = required_kind(request.table)?;
            check_reason(&request.reason)?;
            let if_generation = request.if_generation;
            let outcome = self
                .change_table(kind, "rollback", request.reason, move |engine| {
                    engine.rollback(kind, if_generation)
                })
                .await?;
            Ok(pb::RollbackTableResponse {
                table: Some(convert::table_status(&outcome.table)),
                previous: outcome.previous.map(convert::table_version),
            })
        })
        .await
    }

    async fn set_personalization(
        &self,
        request: Request<pb::SetPersonalizationRequest>,
    ) -> Result<Response<pb::SetPersonalizationResponse>, Status> {
        self.call("SetPersonalization", request, |request| async move {
            check_reason(&request.reason)?;
            let change = self
                .shared
                .engine
                .set_personalization_paused(request.paused);
            self.shared
                .metrics
                .personalization_paused
                .set(i64::from(change.paused));
            tracing::info!(
                target: "fairrank::audit",
                operation = "set_personalization",
                paused = change.paused,
                changed = change.changed,
                reason = request.reason,
                "personalization switch"
            );
            Ok(pb::SetPersonalizationResponse {
                paused: change.paused,
                changed: change.changed,
                since: Some(convert::timestamp(change.since)),
            })
        })
        .await
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.call("GetStatus", request, |_| async move {
            let shared = &self.shared;
            let status = shared
                .engine
                .status()
                .map_err(|error| errors::engine_status(&error))?;
            let metrics = &shared.metrics;
            let counters = pb::Counters {
                rank_requests: metrics.rank_requests.get(),
                rank_batch_calls: metrics.rank_batch_calls.get(),
                rank_errors: metrics.rank_errors.get(),
                personalized_answers: metrics.answers_total(true),
                non_personalized_answers: metrics.answers_total(false),
                dp_answers: metrics.dp_answers.get(),
                replayed_answers: metrics.replayed.get(),
                budget_exhausted: metrics.budget_exhausted.get(),
                shed_requests: metrics.shed.get(),
                in_flight: u64::try_from(metrics.in_flight.get()).unwrap_or(0),
                reloads: metrics.table_changes_total("reload", true),
                reload_failures: metrics.table_changes_total("reload", false),
                rollbacks: metrics.table_changes_total("rollback", true),
            };
            let constraints = shared.engine.fairness_constraints();
            let uptime = shared.started.elapsed();
            Ok(pb::GetStatusResponse {
                server_version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: Some(convert::timestamp(shared.started_at)),
                uptime: prost_types::Duration::try_from(uptime).ok(),
                items_table: Some(convert::table_status(&status.items)),
                users_table: status.users.as_ref().map(convert::table_status),
                personalization_paused: status.personalization_paused,
                personalization_paused_since: Some(convert::timestamp(status.paused_since)),
                counters: Some(counters),
                privacy_ledger: Some(ledger_status(shared.durable_ledger, shared.ledger.as_ref())),
                fairness_constraints: constraints.iter().map(|info| info.name.clone()).collect(),
                fairness_constraint_details: constraints
                    .iter()
                    .map(convert::constraint_info)
                    .collect(),
                privacy_mechanisms: vec![
                    pb::PrivacyMechanism::None as i32,
                    pb::PrivacyMechanism::GumbelTopK as i32,
                ],
                config: shared.config_text.clone(),
            })
        })
        .await
    }
}

/// `GetStatus`'s ledger status: the ledger's totals, or, when they cannot be read (a
/// storage error, a closed ledger during shutdown), zeros with `totals_counted = false` and
/// a warning in the log; the status call itself never fails for them. The read is cheap
/// (memory, or one read transaction that does not wait for writers), so it runs inline.
fn ledger_status(durable: bool, ledger: &dyn state::BudgetLedger) -> pb::PrivacyLedgerStatus {
    let (subjects, rho_charged_total, totals_counted) = match ledger.totals() {
        Ok(totals) => (totals.subjects, totals.rho_charged.to_f64(), true),
        Err(error) => {
            tracing::warn!(%error, "GetStatus: the privacy ledger's totals could not be read");
            (0, 0.0, false)
        }
    };
    pb::PrivacyLedgerStatus {
        enabled: durable,
        subjects,
        rho_charged_total,
        totals_counted,
    }
}

/// Path prefix of the Admin service's methods.
const ADMIN_PATH: &str = "/fairrank.v1.Admin/";

/// The Admin methods the own routes serve (each needs the bearer token).
const ADMIN_METHODS: [&str; 4] = [
    "ReloadTable",
    "RollbackTable",
    "SetPersonalization",
    "GetStatus",
];

/// The Admin method a gRPC path names, if it is one the own routes serve.
pub(super) fn method_of(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix(ADMIN_PATH)?;
    ADMIN_METHODS
        .iter()
        .find(|known| **known == method)
        .copied()
}

/// The Admin service's routes: every method as a [`routes::unary`] route (a body that does
/// not decode is INVALID_ARGUMENT), anything else (an unknown method) by the generated
/// server.
pub type AdminRoutes = Routes<AdminService, AdminServer<AdminService>>;

impl AdminRoutes {
    /// Routes over `service`, with `max_message_bytes` as the decoding limit.
    pub fn new(service: AdminService, max_message_bytes: usize) -> AdminRoutes {
        let service = Arc::new(service);
        // Answers are the server's own (GetStatus carries the whole configuration): not held
        // to the clients' message limit (see `routes::unary`).
        let generated = AdminServer::from_arc(Arc::clone(&service))
            .max_decoding_message_size(max_message_bytes);
        Routes::from_parts(service, generated, max_message_bytes)
    }
}

impl OwnRoutes for AdminService {
    fn route<B>(
        service: &Arc<Self>,
        request: http::Request<B>,
        limit: usize,
    ) -> Result<BoxFuture<http::Response<tonic::body::Body>, Infallible>, http::Request<B>>
    where
        B: Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        let service = Arc::clone(service);
        let Some(method) = method_of(request.uri().path()) else {
            return Err(request);
        };
        // Refused before the body is read (the handlers check again, for direct calls).
        let header = request.headers().get(http::header::AUTHORIZATION);
        if let Err(status) = service.authorize_header(header.map(|value| value.as_bytes())) {
            tracing::warn!(method, code = ?status.code(), "admin call refused");
            service
                .shared
                .metrics
                .record_call(method, status.code(), std::time::Duration::ZERO);
            let answer = errors::status_answer(status);
            return Ok(Box::pin(async move { Ok(answer) }));
        }
        // A body over the size limit or one that does not decode is counted like any
        // other failed admin call.
        let metrics = Arc::clone(&service.shared.metrics);
        let refused = move |status: &Status| {
            tracing::debug!(method, code = ?status.code(), "admin call refused");
            metrics.record_call(method, status.code(), std::time::Duration::ZERO);
        };
        /// A route calling the service's own trait method `$method`.
        macro_rules! route {
            ($method:ident) => {
                Ok(routes::unary(
                    request,
                    limit,
                    move |request| {
                        let service = Arc::clone(&service);
                        Box::pin(async move { Admin::$method(&*service, request).await })
                    },
                    refused,
                ))
            };
        }
        match method {
            "ReloadTable" => route!(reload_table),
            "RollbackTable" => route!(rollback_table),
            "SetPersonalization" => route!(set_personalization),
            "GetStatus" => route!(get_status),
            _ => Err(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc  "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer    "), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn ledger_totals_are_reported_or_marked_uncounted() {
        use state::{BudgetLedger, ChargeRequest, InMemoryLedger, PseudonymKey, Rho};
        let ledger = InMemoryLedger::new();
        let key = PseudonymKey::new(&[9_u8; 32]).expect("key");
        for (subject, rho) in [("alice", 250_000_000), ("bob", 500_000_000)] {
            let request = ChargeRequest {
                pseudonym: key.pseudonym(subject),
                request_id: "r1".to_owned(),
                rho: Rho::from_nano(rho),
                cap: Rho::from_nano(1_000_000_000),
                window: std::time::Duration::from_secs(60),
                now: std::time::SystemTime::now(),
                answer: Vec::new(),
            };
            ledger.charge(&request).expect("charges");
        }
        let counted = ledger_status(false, &ledger);
        assert_eq!(
            counted,
            pb::PrivacyLedgerStatus {
                enabled: false,
                subjects: 2,
                rho_charged_total: 0.75,
                totals_counted: true,
            }
        );
        // A ledger whose totals cannot be read (here: closed) is reported as not counted.
        ledger.close().expect("closes");
        assert_eq!(
            ledger_status(true, &ledger),
            pb::PrivacyLedgerStatus {
                enabled: true,
                subjects: 0,
                rho_charged_total: 0.0,
                totals_counted: false,
            }
        );
    }

    #[test]
    fn reasons_are_limited_and_kinds_required() {
        assert!(check_reason(&"x".repeat(MAX_REASON_BYTES)).is_ok());
        let status = check_reason(&"x".repeat(MAX_REASON_BYTES + 1)).unwrap_err();
        assert_eq!(api::status::error_field(&status), Some("reason"));
        let status = required_kind(0).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(api::status::error_field(&status), Some("table"));
        assert_eq!(required_kind(2).unwrap(), TableKind::Users);
    }
}
