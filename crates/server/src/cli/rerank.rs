//! `fairrank rerank`: offline fairness re-ranking of JSON Lines requests (one pool per line),
//! with the constraint's report and fairness metrics per answer.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use fairness::metrics::{self, PositionWeighting};
use fairness::{
    AmortizedState, AnswerReport, Candidate, FairnessError, Registry, RerankOutput, Reranker,
};
use rand::SeedableRng;
use serde_json::{Map, Value, json};

use super::constraint_spec::parse_constraint_spec;

/// Arguments of `fairrank rerank`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Input, one JSON object per line (blank lines are skipped):
  {\"k\": 10,
   \"constraint\": {\"name\": \"fa*ir\", \"p\": 0.5, \"alpha\": 0.1, \"protected\": 1},
   \"candidates\": [{\"id\": \"a\", \"score\": 3.2, \"group\": 1}, ...],
   \"state\": {\"group_exposure\": {\"0\": 25.0}, \"group_relevance\": {\"0\": 2.4}},
   \"desired\": {\"0\": 0.5, \"1\": 0.5}, \"seed\": 7, \"id\": \"query-1\"}
Only k and candidates are required. constraint defaults to none and may also be a string
such as \"fa*ir:p=0.5,protected=1\"; state is for amortized constraints (fairco; its optional
\"rankings\" counts past rankings, default 0, and FairCo's correction grows with it); desired is
the target group distribution for ndkl, skew and awrf (default: the group shares of the
candidates); seed drives stochastic constraints (default: --seed plus the line number); id is
echoed. Candidates are sorted by score, highest first, ties in input order.

Output, one line per input line:
  {\"line\": n, \"ranking\": [ids], \"satisfied\": bool, \"report\": {...}, \"metrics\":
   {\"ndcg\", \"exposure_share\": {group: share}, \"ndkl\", \"skew\": {group: value}, \"awrf\",
    \"exposure_ratio\"}, \"state\": {...}, \"constraint\": {canonical configuration}}
ndcg is against the unconstrained order (scores clamped at 0 as gains); skew is ln(share in
the answer / desired share), null when the group is absent from the answer (-infinity);
exposure_ratio is the least over the most exposed group per unit of relevance (null if
undefined); state (amortized constraints only) is the state after this answer, ready to feed
into the next line.
A malformed line gets {\"line\": n, \"error\": \"...\", \"field\": \"candidates[2].score\"}
(field is null when the line is not JSON) and the remaining lines are still processed.

Exit status: 0 if every line succeeded, 1 if any line failed (or the input is unreadable).")]
pub struct RerankArgs {
    /// JSON Lines input file; standard input when absent.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Base seed for stochastic constraints on lines without a `seed` (line n uses seed + n).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A refused input line: what is wrong and where.
#[derive(Debug)]
struct LineError {
    field: Option<String>,
    message: String,
}

impl LineError {
    fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// Keys accepted on an input line (anything else is refused as a likely typo).
const KNOWN_KEYS: [&str; 7] = [
    "k",
    "constraint",
    "candidates",
    "state",
    "desired",
    "seed",
    "id",
];

/// Runs `fairrank rerank`; returns the number of lines that failed.
pub fn run(args: &RerankArgs) -> anyhow::Result<u64> {
    let reader: Box<dyn BufRead> = match &args.input {
        Some(path) => Box::new(BufReader::new(
            File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin().lock())),
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let failed = rerank_stream(reader, &mut out, args.seed)?;
    out.flush()?;
    Ok(failed)
}

/// Processes every line of `reader`, writing one answer or error line each to `out`.
fn rerank_stream(mut reader: impl BufRead, out: &mut impl Write, seed: u64) -> anyhow::Result<u64> {
    let registry = Registry::with_builtins();
    let mut rerank_output = RerankOutput::new();
    let mut bytes = Vec::new();
    let mut line_number = 0u64;
    let mut failed = 0u64;
    loop {
        bytes.clear();
        if reader
            .read_until(b'\n', &mut bytes)
            .context("reading the input")?
            == 0
        {
            break;
        }
        line_number += 1;
        let answer = match std::str::from_utf8(&bytes) {
            Err(error) => Err(LineError {
                field: None,
                message: format!("the line is not valid UTF-8: {error}"),
            }),
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => rerank_line(
                &registry,
                text,
                seed.wrapping_add(line_number),
                &mut rerank_output,
            ),
        };
        let line = match answer {
            Ok(mut object) => {
                object.insert("line".to_string(), json!(line_number));
                Value::Object(object)
            }
            Err(error) => {
                failed += 1;
                json!({"line": line_number, "error": error.message, "field": error.field})
            }
        };
        writeln!(out, "{line}")?;
    }
    Ok(failed)
}

/// One parsed input line.
struct Request {
    k: usize,
    reranker: Box<dyn Reranker>,
    /// The pool in score order; `Candidate::id` is the input position.
    pool: Vec<Candidate>,
    /// Input ids by input position.
    ids: Vec<Value>,
    state: Option<AmortizedState>,
    desired: Option<Vec<(u32, f64)>>,
    seed: u64,
    echo_id: Option<Value>,
}

/// Re-ranks one line; the answer object without its `line` key.
fn rerank_line(
    registry: &Registry,
    text: &str,
    default_seed: u64,
    out: &mut RerankOutput,
) -> Result<Map<String, Value>, LineError> {
    let request = parse_request(registry, text, default_seed)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(request.seed);
    request
        .reranker
        .rerank(
            &request.pool,
            request.k,
            request.state.as_ref(),
            &mut rng,
            out,
        )
        .map_err(|error| fairness_error(error, "constraint"))?;
    let metrics = answer_metrics(&request, out)?;
    let ranking: Vec<Value> = out
        .ranked(&request.pool)
        .map(|candidate| request.ids[candidate.id as usize].clone())
        .collect();
    let mut answer = Map::new();
    if let Some(id) = &request.echo_id {
        answer.insert("id".to_string(), id.clone());
    }
    answer.insert("ranking".to_string(), Value::Array(ranking));
    answer.insert("satisfied".to_string(), json!(out.report.satisfied));
    answer.insert("report".to_string(), to_json(&out.report)?);
    answer.insert("metrics".to_string(), metrics);
    if request.reranker.is_amortized() {
        answer.insert(
            "state".to_string(),
            match &out.state {
                Some(state) => to_json(state)?,
                None => Value::Null,
            },
        );
    }
    answer.insert("constraint".to_string(), request.reranker.config());
    Ok(answer)
}

fn to_json(value: &impl serde::Serialize) -> Result<Value, LineError> {
    serde_json::to_value(value).map_err(|error| LineError {
        field: None,
        message: format!("internal error serializing the answer: {error}"),
    })
}

/// Maps a fairness error to the input field it is about.
fn fairness_error(error: FairnessError, constraint_field: &str) -> LineError {
    let field = match &error {
        FairnessError::MissingParameter { parameter, .. }
        | FairnessError::InvalidParameter { parameter, .. }
        | FairnessError::UnknownParameter { parameter, .. } => {
            format!("{constraint_field}.{parameter}")
        }
        FairnessError::UnknownConstraint { .. } | FairnessError::InvalidSpec { .. } => {
            format!("{constraint_field}.name")
        }
        FairnessError::KTooLarge { .. } => "k".to_string(),
        FairnessError::InvalidState { .. } => "state".to_string(),
        FairnessError::InvalidPool { .. } => "candidates".to_string(),
        _ => constraint_field.to_string(),
    };
    LineError::at(field, error.to_string())
}

fn parse_request(registry: &Registry, text: &str, default_seed: u64) -> Result<Request, LineError> {
    let value: Value = serde_json::from_str(text).map_err(|error| LineError {
        field: None,
        message: format!("not valid JSON: {error}"),
    })?;
    let Value::Object(object) = value else {
        return Err(LineError {
            field: None,
            message: "expected a JSON object per line".to_string(),
        });
    };
    if let Some(key) = object
        .keys()
        .find(|key| !KNOWN_KEYS.contains(&key.as_str()))
    {
        return Err(LineError::at(
            key.clone(),
            format!("unknown key `{key}` (expected: {})", KNOWN_KEYS.join(", ")),
        ));
    }
    let k = match object.get("k") {
        None => return Err(LineError::at("k", "missing the answer length `k`")),
        Some(value) => match value.as_u64().and_then(|k| usize::try_from(k).ok()) {
            Some(k) if k >= 1 => k,
            _ => {
                return Err(LineError::at(
                    "k",
                    format!("`k` must be a positive integer, got {value}"),
                ));
            }
        },
    };
    let reranker = match object.get("constraint") {
        None | Some(Value::Null) => registry.build(&json!({"name": "none"})),
        Some(Value::String(text)) => {
            let spec = parse_constraint_spec(text)
                .map_err(|reason| LineError::at("constraint", reason))?;
            registry.build(&spec)
        }
        Some(spec @ Value::Object(_)) => registry.build(spec),
        Some(other) => {
            return Err(LineError::at(
                "constraint",
                format!("expected an object or a string, got {other}"),
            ));
        }
    }
    .map_err(|error| fairness_error(error, "constraint"))?;
    let (pool, ids) = parse_candidates(object.get("candidates"))?;
    let state = match object.get("state") {
        None | Some(Value::Null) => None,
        Some(value) => Some(parse_state(value)?),
    };
    let desired = match object.get("desired") {
        None | Some(Value::Null) => None,
        Some(value) => Some(parse_desired(value)?),
    };
    let seed = match object.get("seed") {
        None | Some(Value::Null) => default_seed,
        Some(value) => value.as_u64().ok_or_else(|| {
            LineError::at(
                "seed",
                format!("`seed` must be a non-negative integer, got {value}"),
            )
        })?,
    };
    Ok(Request {
        k,
        reranker,
        pool,
        ids,
        state,
        desired,
        seed,
        echo_id: object.get("id").cloned(),
    })
}

/// Parses the candidates and sorts them into the pool (score descending, ties by input position).
fn parse_candidates(value: Option<&Value>) -> Result<(Vec<Candidate>, Vec<Value>), LineError> {
    let Some(value) = value else {
        return Err(LineError::at(
            "candidates",
            "missing the `candidates` array",
        ));
    };
    let Value::Array(items) = value else {
        return Err(LineError::at(
            "candidates",
            format!("expected an array of candidates, got {value}"),
        ));
    };
    if u32::try_from(items.len()).is_err() {
        return Err(LineError::at("candidates", "too many candidates"));
    }
    let mut pool = Vec::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    let mut seen = HashSet::with_capacity(items.len());
    for (position, item) in items.iter().enumerate() {
        let field = |name: &str| format!("candidates[{position}].{name}");
        let Value::Object(item) = item else {
            return Err(LineError::at(
                format!("candidates[{position}]"),
                format!("expected an object with id, score and group, got {item}"),
            ));
        };
        if let Some(key) = item
            .keys()
            .find(|key| !["id", "score", "group"].contains(&key.as_str()))
        {
            return Err(LineError::at(
                field(key),
                format!("unknown key `{key}` (expected: id, score, group)"),
            ));
        }
        let id = match item.get("id") {
            Some(id @ Value::String(_)) => id.clone(),
            Some(id @ Value::Number(number)) if number.is_u64() || number.is_i64() => id.clone(),
            Some(other) => {
                return Err(LineError::at(
                    field("id"),
                    format!("expected a string or an integer, got {other}"),
                ));
            }
            None => return Err(LineError::at(field("id"), "missing `id`")),
        };
        if !seen.insert(id.to_string()) {
            return Err(LineError::at(field("id"), format!("duplicate id {id}")));
        }
        let score = match item.get("score") {
            None => return Err(LineError::at(field("score"), "missing `score`")),
            Some(value) => match value.as_f64() {
                // `+ 0.0` turns -0.0 into +0.0 so that zero scores tie.
                Some(score) if (score as f32).is_finite() => score as f32 + 0.0,
                _ => {
                    return Err(LineError::at(
                        field("score"),
                        format!("expected a finite number (32-bit float range), got {value}"),
                    ));
                }
            },
        };
        let group = match item.get("group") {
            None => return Err(LineError::at(field("group"), "missing `group`")),
            Some(value) => value
                .as_u64()
                .and_then(|group| u32::try_from(group).ok())
                .ok_or_else(|| {
                    LineError::at(
                        field("group"),
                        format!("expected an integer group label in 0..2^32, got {value}"),
                    )
                })?,
        };
        pool.push(Candidate::new(position as u32, score, group));
        ids.push(id);
    }
    // Stable: equal scores keep their input order.
    pool.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok((pool, ids))
}

/// Parses a `{"label": number}` object with finite non-negative values.
fn parse_group_map(value: &Value, field: &str) -> Result<BTreeMap<u32, f64>, LineError> {
    let Value::Object(map) = value else {
        return Err(LineError::at(
            field,
            format!("expected an object of numbers per group label, got {value}"),
        ));
    };
    let mut out = BTreeMap::new();
    for (label, number) in map {
        let Ok(group) = label.trim().parse::<u32>() else {
            return Err(LineError::at(
                format!("{field}.{label}"),
                format!("group label {label:?} is not an integer in 0..2^32"),
            ));
        };
        match number.as_f64() {
            Some(number) if number.is_finite() && number >= 0.0 => {
                out.insert(group, number);
            }
            _ => {
                return Err(LineError::at(
                    format!("{field}.{label}"),
                    format!("expected a finite non-negative number, got {number}"),
                ));
            }
        }
    }
    Ok(out)
}

fn parse_state(value: &Value) -> Result<AmortizedState, LineError> {
    let Value::Object(map) = value else {
        return Err(LineError::at(
            "state",
            format!("expected an object with group_exposure and group_relevance, got {value}"),
        ));
    };
    if let Some(key) = map
        .keys()
        .find(|key| !["group_exposure", "group_relevance", "rankings"].contains(&key.as_str()))
    {
        return Err(LineError::at(
            format!("state.{key}"),
            format!("unknown key `{key}` (expected: group_exposure, group_relevance, rankings)"),
        ));
    }
    let group_map = |name: &str| match map.get(name) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(value) => parse_group_map(value, &format!("state.{name}")),
    };
    let rankings = match map.get("rankings") {
        None | Some(Value::Null) => 0,
        Some(value) => value.as_u64().ok_or_else(|| {
            LineError::at(
                "state.rankings",
                format!("expected a non-negative integer, got {value}"),
            )
        })?,
    };
    let state = AmortizedState {
        group_exposure: group_map("group_exposure")?,
        group_relevance: group_map("group_relevance")?,
        rankings,
    };
    state
        .validate()
        .map_err(|error| LineError::at("state", error.to_string()))?;
    Ok(state)
}

fn parse_desired(value: &Value) -> Result<Vec<(u32, f64)>, LineError> {
    let shares = parse_group_map(value, "desired")?;
    let total: f64 = shares.values().sum();
    if shares.is_empty() || shares.values().any(|&share| share <= 0.0) {
        return Err(LineError::at(
            "desired",
            "every desired share must be positive, with at least one group",
        ));
    }
    if (total - 1.0).abs() > 1e-6 {
        return Err(LineError::at(
            "desired",
            format!("desired shares sum to {total}, not 1"),
        ));
    }
    Ok(shares.into_iter().collect())
}

/// The group shares of the pool, as a distribution in label order.
pub fn pool_distribution(pool: &[Candidate]) -> Vec<(u32, f64)> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for candidate in pool {
        *counts.entry(candidate.group).or_default() += 1;
    }
    let total = pool.len().max(1) as f64;
    counts
        .into_iter()
        .map(|(group, count)| (group, count as f64 / total))
        .collect()
}

/// A JSON number, or null when it is not finite.
fn finite_or_null(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

fn answer_metrics(request: &Request, out: &RerankOutput) -> Result<Value, LineError> {
    let metric_error = |error: FairnessError| LineError::at("desired", error.to_string());
    let pool = &request.pool;
    let mut report = AnswerReport::default();
    fairness::answer_report(pool, &out.order, &out.report, &mut report).map_err(|error| {
        LineError {
            field: None,
            message: format!("internal error: {error}"),
        }
    })?;
    let desired = match &request.desired {
        Some(desired) => desired.clone(),
        None => pool_distribution(pool),
    };
    let mut exposure_share = Map::new();
    for &(group, _) in &pool_distribution(pool) {
        let share = report
            .groups
            .iter()
            .find(|entry| entry.group == group)
            .map_or(0.0, |entry| entry.share);
        exposure_share.insert(group.to_string(), json!(share));
    }
    let ranked_groups: Vec<u32> = out.ranked(pool).map(|candidate| candidate.group).collect();
    let (ndkl, skew, awrf) = if ranked_groups.is_empty() {
        (Value::Null, Value::Object(Map::new()), Value::Null)
    } else {
        let ndkl = metrics::ndkl(&ranked_groups, &desired).map_err(metric_error)?;
        let skew = metrics::skew_at_k(&ranked_groups, ranked_groups.len(), &desired)
            .map_err(metric_error)?;
        let awrf = metrics::awrf(&ranked_groups, &desired).map_err(metric_error)?;
        let skew: Map<String, Value> = skew
            .iter()
            .map(|entry| (entry.group.to_string(), finite_or_null(entry.value)))
            .collect();
        (json!(ndkl), Value::Object(skew), json!(awrf))
    };
    let groups: Vec<u32> = pool.iter().map(|candidate| candidate.group).collect();
    let relevance: Vec<f64> = pool
        .iter()
        .map(|candidate| f64::from(candidate.score).max(0.0))
        .collect();
    let exposure_ratio = metrics::exposure_per_relevance_ratio(
        &out.order,
        &groups,
        &relevance,
        PositionWeighting::Dcg,
    )
    .map_err(|error| LineError {
        field: None,
        message: format!("internal error: {error}"),
    })?;
    Ok(json!({
        "ndcg": report.ndcg,
        "exposure_share": exposure_share,
        "ndkl": ndkl,
        "skew": skew,
        "awrf": awrf,
        "exposure_ratio": exposure_ratio,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_lines(input: &str) -> (Vec<Value>, u64) {
        let mut out = Vec::new();
        let failed = rerank_stream(input.as_bytes(), &mut out, 0).expect("runs");
        let lines = String::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("json"))
            .collect();
        (lines, failed)
    }

    #[test]
    fn ties_keep_input_order_and_errors_name_the_field() {
        let input = concat!(
            r#"{"k": 3, "candidates": [{"id": "a", "score": 1, "group": 0}, {"id": "b", "score": 2, "group": 0}, {"id": "c", "score": 1, "group": 1}]}"#,
            "\n\n",
            r#"{"k": 3, "candidates": [{"id": "a", "score": "x", "group": 0}]}"#,
            "\n",
        );
        let (lines, failed) = run_lines(input);
        assert_eq!(failed, 1);
        assert_eq!(lines[0]["ranking"], json!(["b", "a", "c"]));
        assert_eq!(lines[0]["line"], json!(1));
        assert_eq!(lines[1]["line"], json!(3));
        assert_eq!(lines[1]["field"], json!("candidates[0].score"));
    }

    #[test]
    fn unknown_keys_and_bad_parameters_are_refused() {
        let (lines, failed) = run_lines(concat!(
            r#"{"k": 1, "constrant": "none", "candidates": []}"#,
            "\n",
            r#"{"k": 1, "constraint": {"name": "fa*ir", "p": 2, "protected": 1}, "candidates": []}"#,
            "\n",
            r#"{"k": 1, "constraint": "nope", "candidates": []}"#,
            "\n",
        ));
        assert_eq!(failed, 3);
        assert_eq!(lines[0]["field"], json!("constrant"));
        assert_eq!(lines[1]["field"], json!("constraint.p"));
        assert_eq!(lines[2]["field"], json!("constraint.name"));
    }
}
