//! `fairrank rank`: a command-line client of `fairrank.v1.Ranker/Rank` that prints the
//! answer as a readable table or as JSON.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use api::fairrank::v1 as pb;
use api::fairrank::v1::ranker_client::RankerClient;

/// Largest answer the client accepts, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Output formats of `fairrank rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A readable table with the fairness summary.
    Table,
    /// One JSON object.
    Json,
}

/// Arguments of `fairrank rank`.
#[derive(Debug, clap::Args)]
pub struct RankArgs {
    /// Server address, `HOST:PORT` or `http://HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// User id (a row of the server's user table).
    #[arg(long)]
    pub user: String,
    /// Candidate item ids, comma-separated; without it, the whole catalog is ranked.
    #[arg(long, value_delimiter = ',')]
    pub candidates: Vec<String>,
    /// Number of items to return.
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// Re-ranking pool size (at least k); default: the server's.
    #[arg(long)]
    pub pool: Option<u32>,
    /// Attach explanations: reasons, their text and the top contributing dimensions.
    #[arg(long)]
    pub explain: bool,
    /// Fairness constraint (registry name, e.g. `none`); default: the server's.
    #[arg(long)]
    pub constraint: Option<String>,
    /// Constraint parameters as a JSON object, e.g. `{"p": 0.5, "alpha": 0.1}`.
    #[arg(long, requires = "constraint")]
    pub params: Option<String>,
    /// Group attribute the constraint and the report use; default: the server's.
    #[arg(long)]
    pub group_attribute: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
    /// Request id (idempotency key); default: a fresh random id.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Deadline of the call, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

/// Runs `fairrank rank`.
pub fn run(args: &RankArgs) -> anyhow::Result<()> {
    let request = build_request(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let response = runtime.block_on(call(args, request))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.format {
        OutputFormat::Table => write_table(&mut out, &response)?,
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &response_json(&response))?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(())
}

fn build_request(args: &RankArgs) -> anyhow::Result<pb::RankRequest> {
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    let params = match &args.params {
        Some(text) => {
            let json: serde_json::Value =
                serde_json::from_str(text).context("--params is not valid JSON")?;
            let Some(object) = json.as_object() else {
                bail!("--params must be a JSON object, for example '{{\"p\": 0.5}}'");
            };
            Some(api::params::json_to_struct(object).context("--params")?)
        }
        None => None,
    };
    let fairness =
        (args.constraint.is_some() || args.group_attribute.is_some()).then(|| pb::FairnessPolicy {
            constraint: args.constraint.clone().unwrap_or_default(),
            params,
            group_attribute: args.group_attribute.clone().unwrap_or_default(),
            ..pb::FairnessPolicy::default()
        });
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| format!("cli-{:032x}", rand::random::<u128>()));
    Ok(pb::RankRequest {
        request_id,
        user: Some(pb::rank_request::User::UserId(args.user.clone())),
        candidate_ids: args.candidates.clone(),
        k: args.k,
        pool_size: args.pool,
        fairness,
        explain: args.explain.then_some(pb::ExplainOptions {
            level: pb::ExplainLevel::Dimensions as i32,
            max_dimensions: 0,
        }),
        ..pb::RankRequest::default()
    })
}

/// The endpoint URI of `--addr`.
fn endpoint_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn call(args: &RankArgs, request: pb::RankRequest) -> anyhow::Result<pb::RankResponse> {
    let uri = endpoint_uri(&args.addr);
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .with_context(|| format!("--addr {:?} is not a valid address", args.addr))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))?;
    let mut client = RankerClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    let mut call = tonic::Request::new(request);
    call.set_timeout(Duration::from_millis(args.timeout_ms));
    match client.rank(call).await {
        Ok(response) => Ok(response.into_inner()),
        Err(status) => {
            let reason = api::status::error_reason(&status);
            let field = api::status::error_field(&status)
                .map(|field| format!(", field `{field}`"))
                .unwrap_or_default();
            bail!(
                "the server refused the request: {:?} ({}{field}): {}",
                status.code(),
                reason.as_str_name(),
                status.message()
            )
        }
    }
}

fn enum_name<E: TryFrom<i32>>(value: i32, name: impl Fn(E) -> &'static str) -> &'static str {
    E::try_from(value).map_or("UNKNOWN", name)
}

fn score_kind_name(value: i32) -> &'static str {
    enum_name(value, |kind: pb::ScoreKind| kind.as_str_name())
}

fn write_table(out: &mut impl Write, response: &pb::RankResponse) -> std::io::Result<()> {
    let version = response.items_table.unwrap_or_default();
    let personalization = if response.personalized {
        "personalized".to_owned()
    } else {
        format!(
            "not personalized ({})",
            enum_name(
                response.non_personalized_reason,
                |reason: pb::NonPersonalizedReason| { reason.as_str_name() }
            )
        )
    };
    writeln!(
        out,
        "request {}{}: {} items of {} scored, pool {}, {personalization}",
        response.request_id,
        if response.replayed { " (replayed)" } else { "" },
        response.items.len(),
        response.scored_items,
        response.pool_size,
    )?;
    writeln!(
        out,
        "item table generation {} (checksum {:016x}), scores: {}",
        version.generation,
        version.checksum,
        score_kind_name(response.score_kind)
    )?;
    let id_width = response
        .items
        .iter()
        .map(|item| item.item_id.len())
        .max()
        .unwrap_or(0)
        .max("item".len());
    writeln!(
        out,
        "{:>4}  {:<id_width$}  {:>12}  {:>7}  groups",
        "rank", "item", "score", "before"
    )?;
    for item in &response.items {
        let score = item
            .score
            .map_or_else(|| "-".to_owned(), |score| format!("{score:.6}"));
        let groups = response
            .group_attributes
            .iter()
            .zip(&item.group_labels)
            .map(|(name, label)| format!("{name}={label}"))
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            out,
            "{:>4}  {:<id_width$}  {:>12}  {:>7}  {groups}",
            item.rank, item.item_id, score, item.unconstrained_rank
        )?;
        if let Some(explanation) = &item.explanation {
            for reason in &explanation.reasons {
                let code = enum_name(reason.code, |code: pb::ReasonCode| code.as_str_name());
                writeln!(out, "        {code}: {}", reason.text)?;
            }
            if !explanation.contributions.is_empty() {
                let dims = explanation
                    .contributions
                    .iter()
                    .map(|c| {
                        let name = if c.name.is_empty() {
                            format!("dim {}", c.dimension)
                        } else {
                            c.name.clone()
                        };
                        format!("{name} {:+.4}", c.contribution)
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                writeln!(out, "        top dimensions: {dims}")?;
            }
        }
    }
    if let Some(fairness) = &response.fairness {
        writeln!(
            out,
            "fairness: constraint {}, {}, nDCG vs unconstrained {:.4}{}",
            fairness.constraint,
            if fairness.satisfied {
                "satisfied"
            } else {
                "NOT satisfied"
            },
            fairness.ndcg_vs_unconstrained,
            if fairness.group_attribute.is_empty() {
                String::new()
            } else {
                format!(", groups by {}", fairness.group_attribute)
            }
        )?;
        for group in &fairness.groups {
            writeln!(
                out,
                "  group {}: {} returned ({} in pool), exposure {:.1}% (unconstrained {:.1}%)",
                group.group,
                group.items_returned,
                group.items_in_pool,
                100.0 * group.exposure_share,
                100.0 * group.unconstrained_exposure_share
            )?;
        }
    }
    if let Some(privacy) = response
        .privacy
        .as_ref()
        .filter(|privacy| privacy.dp_applied)
    {
        let mechanism = enum_name(privacy.mechanism, |mechanism: pb::PrivacyMechanism| {
            mechanism.as_str_name()
        });
        let optional =
            |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.6}"));
        writeln!(
            out,
            "privacy: {mechanism}, rho charged {:.6}, epsilon {} (delta {}), rho left {}{}",
            privacy.rho_charged,
            optional(privacy.epsilon),
            optional(privacy.delta),
            optional(privacy.rho_remaining),
            if privacy.scores_noised {
                ", scores noised"
            } else {
                ""
            }
        )?;
    }
    if let Some(timings) = &response.timings {
        writeln!(
            out,
            "server time {} us (queue {}, score {}, report {})",
            timings.total_us, timings.queue_us, timings.score_us, timings.report_us
        )?;
    }
    Ok(())
}

fn response_json(response: &pb::RankResponse) -> serde_json::Value {
    use serde_json::json;
    let version = |version: &Option<pb::TableVersion>| {
        version.map(|version| {
            json!({"generation": version.generation, "checksum": format!("{:016x}", version.checksum)})
        })
    };
    let items: Vec<serde_json::Value> = response
        .items
        .iter()
        .map(|item| {
            let explanation = item.explanation.as_ref().map(|explanation| {
                json!({
                    "reasons": explanation.reasons.iter().map(|reason| json!({
                        "code": enum_name(reason.code, |code: pb::ReasonCode| code.as_str_name()),
                        "text": reason.text,
                    })).collect::<Vec<_>>(),
                    "contributions": explanation.contributions.iter().map(|c| json!({
                        "dimension": c.dimension,
                        "name": c.name,
                        "contribution": c.contribution,
                    })).collect::<Vec<_>>(),
                })
            });
            json!({
                "item_id": item.item_id,
                "rank": item.rank,
                "score": item.score,
                "unconstrained_rank": item.unconstrained_rank,
                "group_labels": item.group_labels,
                "explanation": explanation,
            })
        })
        .collect();
    let fairness = response.fairness.as_ref().map(|fairness| {
        json!({
            "constraint": fairness.constraint,
            "group_attribute": fairness.group_attribute,
            "satisfied": fairness.satisfied,
            "ndcg_vs_unconstrained": fairness.ndcg_vs_unconstrained,
            "groups": fairness.groups.iter().map(|group| json!({
                "group": group.group,
                "items_returned": group.items_returned,
                "items_in_pool": group.items_in_pool,
                "exposure_share": group.exposure_share,
                "unconstrained_exposure_share": group.unconstrained_exposure_share,
                "target_share": group.target_share,
            })).collect::<Vec<_>>(),
            "violations": fairness.violations.iter().map(|violation| json!({
                "kind": enum_name(violation.kind, |kind: pb::ViolationKind| kind.as_str_name()),
                "position": violation.position,
                "group": violation.group,
                "required": violation.required,
                "actual": violation.actual,
                "description": violation.description,
            })).collect::<Vec<_>>(),
            "fallback": enum_name(fairness.fallback, |fallback: pb::FairnessFallback| {
                fallback.as_str_name()
            }),
            "fallback_reason": fairness.fallback_reason,
            "amortized": fairness.amortized.iter().map(|group| json!({
                "group": group.group,
                "exposure_share": group.exposure_share,
                "merit_share": group.merit_share,
            })).collect::<Vec<_>>(),
            "exposure_scope": fairness.exposure_scope,
            "amortized_disparity": fairness.amortized_disparity,
            "optimality": fairness.optimality.map(|optimality| json!({
                "utility": optimality.utility,
                "upper_bound": optimality.upper_bound,
                "gap": optimality.gap,
                "exact": optimality.exact,
            })),
            "seed": fairness.seed,
            "notes": fairness.notes,
        })
    });
    let privacy = response.privacy.as_ref().map(|privacy| {
        json!({
            "dp_applied": privacy.dp_applied,
            "mechanism": enum_name(privacy.mechanism, |mechanism: pb::PrivacyMechanism| {
                mechanism.as_str_name()
            }),
            "rho_charged": privacy.rho_charged,
            "epsilon": privacy.epsilon,
            "delta": privacy.delta,
            "rho_remaining": privacy.rho_remaining,
            "rho_budget": privacy.rho_budget,
            "budget_resets_at_unix_seconds": privacy.budget_resets_at.map(|at| at.seconds),
            "scores_noised": privacy.scores_noised,
            "score_noise_stddev": privacy.score_noise_stddev,
            "user_norm_bound": privacy.user_norm_bound,
        })
    });
    let timings = response.timings.map(|timings| {
        json!({
            "total_us": timings.total_us,
            "queue_us": timings.queue_us,
            "validate_us": timings.validate_us,
            "resolve_user_us": timings.resolve_user_us,
            "score_us": timings.score_us,
            "select_pool_us": timings.select_pool_us,
            "rerank_us": timings.rerank_us,
            "explain_us": timings.explain_us,
            "report_us": timings.report_us,
            "ledger_us": timings.ledger_us,
        })
    });
    json!({
        "request_id": response.request_id,
        "replayed": response.replayed,
        "personalized": response.personalized,
        "non_personalized_reason": enum_name(
            response.non_personalized_reason,
            |reason: pb::NonPersonalizedReason| reason.as_str_name()
        ),
        "score_kind": score_kind_name(response.score_kind),
        "group_attributes": response.group_attributes,
        "items": items,
        "fairness": fairness,
        "privacy": privacy,
        "explain_level": enum_name(response.explain_level, |level: pb::ExplainLevel| {
            level.as_str_name()
        }),
        "audit_id": response.audit_id,
        "items_table": version(&response.items_table),
        "users_table": version(&response.users_table),
        "scored_items": response.scored_items,
        "pool_size": response.pool_size,
        "skipped_candidate_ids": response.skipped_candidate_ids,
        "total_us": response.timings.map(|timings| timings.total_us),
        "timings": timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        rank: RankArgs,
    }

    fn parse(args: &[&str]) -> RankArgs {
        Harness::try_parse_from(std::iter::once("rank").chain(args.iter().copied()))
            .unwrap()
            .rank
    }

    #[test]
    fn flags_become_the_request() {
        let args = parse(&[
            "--user",
            "u-1",
            "--candidates",
            "a,b,c",
            "--k",
            "2",
            "--pool",
            "3",
            "--explain",
            "--constraint",
            "none",
            "--params",
            "{\"p\": 0.5}",
            "--request-id",
            "r-1",
        ]);
        let request = build_request(&args).unwrap();
        assert_eq!(request.request_id, "r-1");
        assert_eq!(request.candidate_ids, ["a", "b", "c"]);
        assert_eq!((request.k, request.pool_size), (2, Some(3)));
        assert_eq!(
            request.explain.unwrap().level,
            pb::ExplainLevel::Dimensions as i32
        );
        let fairness = request.fairness.unwrap();
        assert_eq!(fairness.constraint, "none");
        assert!(fairness.params.unwrap().fields.contains_key("p"));
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(build_request(&parse(&["--user", "u", "--k", "0"])).is_err());
        let args = parse(&["--user", "u", "--constraint", "x", "--params", "[1]"]);
        assert!(build_request(&args).is_err());
        let fresh = build_request(&parse(&["--user", "u"])).unwrap();
        assert!(fresh.request_id.starts_with("cli-"));
        assert!(fresh.fairness.is_none());
    }

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(endpoint_uri("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(endpoint_uri("https://h:1"), "https://h:1");
    }

    #[test]
    fn the_table_lists_items_and_the_fairness_summary() {
        let response = pb::RankResponse {
            request_id: "r-1".into(),
            items: vec![pb::RankedItem {
                item_id: "i-7".into(),
                rank: 1,
                score: Some(0.5),
                unconstrained_rank: 1,
                group_labels: vec![1],
                explanation: None,
            }],
            score_kind: pb::ScoreKind::DotProduct as i32,
            group_attributes: vec!["provider_group".into()],
            personalized: true,
            fairness: Some(pb::FairnessReport {
                constraint: "none".into(),
                satisfied: true,
                ndcg_vs_unconstrained: 1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut text = Vec::new();
        write_table(&mut text, &response).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("i-7"), "{text}");
        assert!(text.contains("provider_group=1"), "{text}");
        assert!(text.contains("SCORE_KIND_DOT_PRODUCT"), "{text}");
        assert!(text.contains("constraint none, satisfied"), "{text}");
        let json = response_json(&response);
        assert_eq!(json["items"][0]["item_id"], "i-7");
    }

    #[test]
    fn json_and_table_carry_the_privacy_report_and_every_stage() {
        let response = pb::RankResponse {
            request_id: "r-2".into(),
            explain_level: pb::ExplainLevel::Reasons as i32,
            privacy: Some(pb::PrivacyReport {
                dp_applied: true,
                mechanism: pb::PrivacyMechanism::GumbelTopK as i32,
                rho_charged: 0.125,
                epsilon: Some(1.5),
                delta: Some(1e-6),
                rho_remaining: Some(0.875),
                ..Default::default()
            }),
            fairness: Some(pb::FairnessReport {
                constraint: "fa*ir".into(),
                notes: vec!["adjusted alpha".into()],
                optimality: Some(pb::FairnessOptimality {
                    utility: 2.0,
                    upper_bound: 2.5,
                    gap: 0.5,
                    exact: false,
                }),
                ..Default::default()
            }),
            timings: Some(pb::StageTimings {
                total_us: 90,
                validate_us: 11,
                ledger_us: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        let json = response_json(&response);
        assert_eq!(json["privacy"]["dp_applied"], true);
        assert_eq!(
            json["privacy"]["mechanism"],
            "PRIVACY_MECHANISM_GUMBEL_TOP_K"
        );
        assert_eq!(json["privacy"]["rho_charged"], 0.125);
        assert_eq!(json["privacy"]["epsilon"], 1.5);
        assert_eq!(json["explain_level"], "EXPLAIN_LEVEL_REASONS");
        assert_eq!(json["timings"]["validate_us"], 11);
        assert_eq!(json["timings"]["ledger_us"], 7);
        assert_eq!(json["total_us"], 90);
        assert_eq!(json["fairness"]["notes"][0], "adjusted alpha");
        assert_eq!(json["fairness"]["optimality"]["gap"], 0.5);
        let mut text = Vec::new();
        write_table(&mut text, &response).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("privacy: PRIVACY_MECHANISM_GUMBEL_TOP_K, rho charged 0.125000"),
            "{text}"
        );
    }
}
