//! `fairrank eval`: replays user queries through kernel top-pool scoring and each fairness
//! constraint, and reports utility against fairness as a Markdown table, a CSV and an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use engine::TableKind;
use fairness::metrics::{self, PositionWeighting};
use fairness::{
    AmortizedState, AnswerReport, Candidate, Registry, RerankOutput, Reranker, dcg_weight,
};
use kernels::{RowMatrix, ScoredItem};
use rand::{Rng, SeedableRng};
use store::Table;

use super::constraint_spec::{parse_constraint_spec, spec_label};
use super::rerank::pool_distribution;

/// Arguments of `fairrank eval`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Constraint settings (--constraints, one or more) are JSON objects or the compact form
name:key=value,...; for example
  --constraints none 'fa*ir:p=0.5,alpha=0.1,protected=1' \\
                '{\"name\": \"det-greedy\", \"targets\": {\"1\": 0.3}}' fairco:lambda=0.01
(share lists also work unquoted: det-greedy:targets=0:0.7,1:0.3).

For each of --queries user rows (drawn with --seed, without replacement when there are enough
rows), the exact top --pool items by dot product form the pool; each constraint re-ranks it
to --k items. Amortized constraints (fairco) carry their state from query to query.

Columns, averaged over queries: ndcg (NDCG@k against the unconstrained order, scores clamped
at 0 as gains), exposure_ratio (least over most exposed group per unit of relevance, DCG
weights, over the groups with relevance in the pool; 1 is exposure proportional to merit),
amortized_exposure_ratio (the same ratio over exposure and relevance summed over all
queries), ndkl and awrf (against the pool's group distribution), satisfied and fallback
(share of queries), rerank_us (mean re-ranking time, informational only).

Writes eval.md (also printed), eval.csv and eval.svg (NDCG against exposure ratio, one
labeled point per constraint setting; the dashed line marks the unconstrained order) into
--out-dir, the current directory by default.")]
pub struct EvalArgs {
    /// Item table; without it, the built-in default dataset.
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// User table whose rows are the queries; without it, the default dataset's users.
    #[arg(long)]
    pub users: Option<PathBuf>,
    /// Constraint settings to compare, one point each (JSON or name:key=value,...).
    #[arg(long, num_args = 1.., required = true)]
    pub constraints: Vec<String>,
    /// Number of user queries to replay.
    #[arg(long, default_value_t = 100)]
    pub queries: usize,
    /// Pool size: items scored into the unconstrained pool per query.
    #[arg(long, default_value_t = 100)]
    pub pool: usize,
    /// Answer length after re-ranking.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Folder for eval.md, eval.csv and eval.svg (created if missing).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Seed of the query choice and of stochastic constraints.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Item group attribute the constraints and metrics use (default: the table's first).
    #[arg(long)]
    pub group_attribute: Option<String>,
    /// Item table of true latent vectors (same rows as --table): true relevance is the dot
    /// product with the user row, giving the true_ndcg and true_exposure_ratio columns.
    /// Default: the default dataset's true items when --table is not given.
    #[arg(long)]
    pub true_items: Option<PathBuf>,
}

/// Aggregated results of one constraint setting over all queries.
#[derive(Debug, Clone)]
struct Summary {
    label: String,
    spec: serde_json::Value,
    ndcg: f64,
    exposure_ratio: Option<f64>,
    amortized_exposure_ratio: Option<f64>,
    ndkl: Option<f64>,
    awrf: Option<f64>,
    true_ndcg: Option<f64>,
    true_exposure_ratio: Option<f64>,
    satisfied: f64,
    fallback: f64,
    rerank_micros: f64,
}

/// The replayed queries: the unconstrained pool of each, in score order.
struct Workload {
    pools: Vec<Vec<Candidate>>,
    /// Per query, the true relevance of each pool position (with `--true-items`).
    true_relevance: Option<Vec<Vec<f64>>>,
    description: String,
}

/// Runs `fairrank eval`.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    if args.k == 0 || args.pool == 0 || args.queries == 0 {
        bail!("--k, --pool and --queries must be at least 1");
    }
    if args.pool < args.k {
        bail!(
            "--pool {} is smaller than --k {}: the re-ranker needs at least k candidates",
            args.pool,
            args.k
        );
    }
    let registry = Registry::with_builtins();
    let mut rerankers = Vec::with_capacity(args.constraints.len());
    for text in &args.constraints {
        let spec = parse_constraint_spec(text).map_err(anyhow::Error::msg)?;
        let reranker = registry
            .build(&spec)
            .with_context(|| format!("constraint {text:?}"))?;
        rerankers.push((spec, reranker));
    }
    let workload = load_workload(args)?;
    let baseline = evaluate(
        &*registry.build(&serde_json::json!({"name": "none"}))?,
        &serde_json::json!({"name": "none"}),
        &workload,
        args.k,
        args.seed,
    )?;
    let mut summaries = Vec::with_capacity(rerankers.len());
    for (spec, reranker) in &rerankers {
        summaries.push(
            evaluate(&**reranker, spec, &workload, args.k, args.seed)
                .with_context(|| format!("evaluating {}", spec_label(spec)))?,
        );
    }
    let out_dir = args.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let markdown = markdown_report(
        &workload.description,
        args.k,
        workload.true_relevance.is_some(),
        &baseline,
        &summaries,
    );
    print!("{markdown}");
    let files = [
        ("eval.md", markdown),
        ("eval.csv", csv_report(&summaries)),
        ("eval.svg", svg_plot(args.k, &baseline, &summaries)),
    ];
    for (name, contents) in files {
        let path = out_dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Opens the tables, picks the queries and scores each query's pool with the kernels.
fn load_workload(args: &EvalArgs) -> anyhow::Result<Workload> {
    let default_dataset = if args.table.is_none() || args.users.is_none() {
        Some(datasets::default_dataset().context("preparing the built-in default dataset")?)
    } else {
        None
    };
    let pick = |given: &Option<PathBuf>, default: fn(&datasets::DefaultDataset) -> PathBuf| {
        given
            .clone()
            .or_else(|| default_dataset.as_ref().map(default))
            .context("no table given and no default dataset")
    };
    let table_path = pick(&args.table, |dataset| dataset.items.clone())?;
    let users_path = pick(&args.users, |dataset| dataset.users.clone())?;
    let table = super::open_in_role(TableKind::Items, &table_path)?;
    let users = super::open_in_role(TableKind::Users, &users_path)?;
    if users.dim() != table.dim() {
        bail!(
            "user table {} has dimension {}, but item table {} has dimension {}",
            users_path.display(),
            users.dim(),
            table_path.display(),
            table.dim()
        );
    }
    if users.is_empty() || table.is_empty() {
        bail!("the item and user tables must both have rows");
    }
    let attribute = match &args.group_attribute {
        Some(name) => table.group_attribute_index(name).with_context(|| {
            format!(
                "{} has no group attribute {name:?} (it has: {})",
                table_path.display(),
                table.group_attribute_names().join(", ")
            )
        })?,
        None if table.group_attribute_names().is_empty() => bail!(
            "{} has no group attribute; fairness evaluation needs item group labels",
            table_path.display()
        ),
        None => 0,
    };
    let attribute_name = table.group_attribute_names()[attribute].clone();
    let labels = table.group_labels(attribute);
    let rows = choose_rows(users.len(), args.queries, args.seed);
    let mut query_data = Vec::with_capacity(rows.len() * users.dim());
    for &row in &rows {
        query_data.extend_from_slice(users.row(row));
    }
    let items = RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride())?;
    let queries = RowMatrix::new(&query_data, rows.len(), users.dim(), users.dim())?;
    let mut scored: Vec<Vec<ScoredItem>> = Vec::new();
    kernels::batch_topk(items, queries, args.pool, &mut scored)
        .context("scoring the query pools")?;
    let true_items_path = args.true_items.clone().or_else(|| {
        default_dataset
            .as_ref()
            .filter(|_| args.table.is_none())
            .map(|dataset| dataset.true_items.clone())
    });
    let true_relevance = match &true_items_path {
        Some(path) => Some(true_relevance(
            path,
            &table,
            &query_data,
            users.dim(),
            &scored,
        )?),
        None => None,
    };
    let pools = scored
        .iter()
        .map(|best| {
            best.iter()
                .map(|item| Candidate::new(item.index, item.score, labels[item.index as usize]))
                .collect()
        })
        .collect();
    let description = format!(
        "items `{}` ({} rows, group attribute `{attribute_name}`), users `{}`, {} queries \
         (seed {}), pool {}, k {}",
        table_path.display(),
        table.len(),
        users_path.display(),
        rows.len(),
        args.seed,
        args.pool.min(table.len()),
        args.k
    );
    let description = match &true_items_path {
        Some(path) => format!("{description}, true relevance from `{}`", path.display()),
        None => description,
    };
    Ok(Workload {
        pools,
        true_relevance,
        description,
    })
}

/// True relevance `<user, true item vector>` of every pool item, per query.
fn true_relevance(
    path: &std::path::Path,
    table: &Table,
    query_data: &[f32],
    dim: usize,
    scored: &[Vec<ScoredItem>],
) -> anyhow::Result<Vec<Vec<f64>>> {
    let true_items = super::open_in_role(TableKind::Items, path)?;
    if true_items.len() != table.len() || true_items.dim() != table.dim() {
        bail!(
            "true item table {} has {} rows of dimension {}, but the item table has {} of {}",
            path.display(),
            true_items.len(),
            true_items.dim(),
            table.len(),
            table.dim()
        );
    }
    let matrix = RowMatrix::new(
        true_items.rows(),
        true_items.len(),
        true_items.dim(),
        true_items.row_stride(),
    )?;
    let mut indices = Vec::new();
    let mut scores = Vec::new();
    let mut out = Vec::with_capacity(scored.len());
    for (query, best) in query_data.chunks_exact(dim).zip(scored) {
        indices.clear();
        indices.extend(best.iter().map(|item| item.index));
        kernels::score_candidates(matrix, query, &indices, &mut scores)?;
        out.push(scores.iter().map(|&score| f64::from(score)).collect());
    }
    Ok(out)
}

/// `count` user rows out of `rows`, chosen with `seed`: distinct rows when there are enough,
/// otherwise every row once and the rest drawn with replacement.
fn choose_rows(rows: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut chosen = rand::seq::index::sample(&mut rng, rows, count.min(rows)).into_vec();
    while chosen.len() < count {
        chosen.push(rng.random_range(0..rows));
    }
    chosen
}

/// Mean of the values that are present, or `None`.
fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (sum, count) = values
        .into_iter()
        .flatten()
        .fold((0.0, 0usize), |(sum, count), value| {
            (sum + value, count + 1)
        });
    (count > 0).then(|| sum / count as f64)
}

/// Replays every pool through `reranker` and aggregates the metrics.
fn evaluate(
    reranker: &dyn Reranker,
    spec: &serde_json::Value,
    workload: &Workload,
    k: usize,
    seed: u64,
) -> anyhow::Result<Summary> {
    let pools = &workload.pools;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = RerankOutput::new();
    let mut report = AnswerReport::default();
    let mut state: Option<AmortizedState> = None;
    let mut ndcg = Vec::with_capacity(pools.len());
    let mut ratios = Vec::with_capacity(pools.len());
    let mut ndkls = Vec::with_capacity(pools.len());
    let mut awrfs = Vec::with_capacity(pools.len());
    let (mut satisfied, mut fallback) = (0usize, 0usize);
    let mut total_exposure: BTreeMap<u32, f64> = BTreeMap::new();
    let mut total_merit: BTreeMap<u32, f64> = BTreeMap::new();
    let mut seconds = 0.0;
    let mut groups = Vec::new();
    let mut relevance = Vec::new();
    let mut ranked_groups = Vec::new();
    let mut true_ndcgs = Vec::new();
    let mut true_ratios = Vec::new();
    let mut gains = Vec::new();
    let mut ideal = Vec::new();
    for (query, pool) in pools.iter().enumerate() {
        let started = Instant::now();
        reranker.rerank(pool, k, state.as_ref(), &mut rng, &mut out)?;
        seconds += started.elapsed().as_secs_f64();
        if reranker.is_amortized() {
            state.clone_from(&out.state);
        }
        fairness::answer_report(pool, &out.order, &out.report, &mut report)?;
        ndcg.push(report.ndcg);
        satisfied += usize::from(out.report.satisfied);
        fallback += usize::from(out.report.fallback);
        groups.clear();
        groups.extend(pool.iter().map(|candidate| candidate.group));
        relevance.clear();
        relevance.extend(pool.iter().map(|item| f64::from(item.score).max(0.0)));
        ratios.push(metrics::exposure_per_relevance_ratio(
            &out.order,
            &groups,
            &relevance,
            PositionWeighting::Dcg,
        )?);
        ranked_groups.clear();
        ranked_groups.extend(out.ranked(pool).map(|candidate| candidate.group));
        if !ranked_groups.is_empty() {
            let distribution = pool_distribution(pool);
            ndkls.push(Some(metrics::ndkl(&ranked_groups, &distribution)?));
            awrfs.push(Some(metrics::awrf(&ranked_groups, &distribution)?));
        }
        if let Some(truth) = workload
            .true_relevance
            .as_ref()
            .and_then(|all| all.get(query))
        {
            // Gains are true relevance clamped at 0; the ideal is the best k of the pool.
            gains.clear();
            gains.extend(
                out.order
                    .iter()
                    .map(|&position| truth.get(position).map_or(0.0, |&gain| gain.max(0.0))),
            );
            ideal.clear();
            ideal.extend(truth.iter().map(|&gain| gain.max(0.0)));
            ideal.sort_by(|a, b| b.total_cmp(a));
            true_ndcgs.push(Some(metrics::ndcg_at_k(&gains, &ideal, k)?));
            ideal.clear();
            ideal.extend(truth.iter().map(|&gain| gain.max(0.0)));
            true_ratios.push(metrics::exposure_per_relevance_ratio(
                &out.order,
                &groups,
                &ideal,
                PositionWeighting::Dcg,
            )?);
        }
        for (&group, &merit) in groups.iter().zip(&relevance) {
            *total_merit.entry(group).or_default() += merit;
        }
        for (index, &group) in ranked_groups.iter().enumerate() {
            *total_exposure.entry(group).or_default() += dcg_weight(index + 1);
        }
    }
    let queries = pools.len().max(1) as f64;
    Ok(Summary {
        label: spec_label(spec),
        spec: spec.clone(),
        ndcg: ndcg.iter().sum::<f64>() / queries,
        exposure_ratio: mean(ratios),
        amortized_exposure_ratio: amortized_ratio(&total_exposure, &total_merit),
        ndkl: mean(ndkls),
        awrf: mean(awrfs),
        true_ndcg: mean(true_ndcgs),
        true_exposure_ratio: mean(true_ratios),
        satisfied: satisfied as f64 / queries,
        fallback: fallback as f64 / queries,
        rerank_micros: seconds * 1e6 / queries,
    })
}

/// `min_G E(G) / M(G)` over `max_G E(G) / M(G)` for groups with merit.
fn amortized_ratio(exposure: &BTreeMap<u32, f64>, merit: &BTreeMap<u32, f64>) -> Option<f64> {
    let (low, high) = merit
        .iter()
        .filter(|(_, merit)| **merit > 0.0)
        .map(|(group, merit)| exposure.get(group).copied().unwrap_or(0.0) / merit)
        .fold((f64::INFINITY, 0.0f64), |(low, high), ratio| {
            (low.min(ratio), high.max(ratio))
        });
    (high > 0.0 && low.is_finite()).then(|| low / high)
}

fn format_option(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |value| format!("{value:.4}"))
}

fn markdown_report(
    description: &str,
    k: usize,
    with_truth: bool,
    baseline: &Summary,
    rows: &[Summary],
) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "# fairrank eval\n\n{description}.\n");
    let _ = writeln!(
        text,
        "Unconstrained score order: exposure ratio {}, amortized exposure ratio {}.\n",
        format_option(baseline.exposure_ratio),
        format_option(baseline.amortized_exposure_ratio)
    );
    let truth_header = if with_truth {
        format!(" true NDCG@{k} | true exposure ratio |")
    } else {
        String::new()
    };
    let _ = writeln!(
        text,
        "| constraint | NDCG@{k} | exposure ratio | amortized exposure ratio | NDKL | AWRF |\
         {truth_header} satisfied | fallback | re-rank µs |"
    );
    let truth_rule = if with_truth { "---:|---:|" } else { "" };
    let _ = writeln!(
        text,
        "|---|---:|---:|---:|---:|---:|{truth_rule}---:|---:|---:|"
    );
    for row in rows {
        let truth = if with_truth {
            format!(
                " {} | {} |",
                format_option(row.true_ndcg),
                format_option(row.true_exposure_ratio)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            text,
            "| `{}` | {:.4} | {} | {} | {} | {} |{truth} {:.1}% | {:.1}% | {:.1} |",
            row.label.replace('|', "\\|"),
            row.ndcg,
            format_option(row.exposure_ratio),
            format_option(row.amortized_exposure_ratio),
            format_option(row.ndkl),
            format_option(row.awrf),
            row.satisfied * 100.0,
            row.fallback * 100.0,
            row.rerank_micros
        );
    }
    text
}

/// Quotes a CSV field when needed (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn csv_report(rows: &[Summary]) -> String {
    let number = |value: Option<f64>| value.map_or_else(String::new, |value| value.to_string());
    let mut text = String::from(
        "constraint,spec,ndcg,exposure_ratio,amortized_exposure_ratio,ndkl,awrf,true_ndcg,\
         true_exposure_ratio,satisfied_rate,fallback_rate,rerank_us\n",
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&row.label),
            csv_field(&row.spec.to_string()),
            row.ndcg,
            number(row.exposure_ratio),
            number(row.amortized_exposure_ratio),
            number(row.ndkl),
            number(row.awrf),
            number(row.true_ndcg),
            number(row.true_exposure_ratio),
            row.satisfied,
            row.fallback,
            row.rerank_micros
        );
    }
    text
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A hand-written SVG scatter plot: exposure ratio (x, 0 to 1) against NDCG (y).
fn svg_plot(k: usize, baseline: &Summary, rows: &[Summary]) -> String {
    const WIDTH: f64 = 760.0;
    const HEIGHT: f64 = 520.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 40.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 70.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let lowest = rows.iter().map(|row| row.ndcg).fold(1.0f64, f64::min);
    // NDCG axis from a round value below the lowest point up to 1.
    let y_min = ((lowest - 0.02) * 10.0).floor().clamp(0.0, 9.0) / 10.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    // Both axes get a little padding so that points never sit on the frame.
    const PAD: f64 = 0.04;
    let x_of = |ratio: f64| LEFT + (ratio.clamp(0.0, 1.0) + PAD) / (1.0 + 2.0 * PAD) * plot_width;
    let y_top = 1.0 + PAD * (1.0 - y_min);
    let y_of = |ndcg: f64| TOP + (y_top - ndcg.clamp(y_min, 1.0)) / (y_top - y_min) * plot_height;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">Utility vs fairness: NDCG@{k} against exposure ratio</text>"#,
        WIDTH / 2.0
    );
    for step in 0..=5 {
        let fraction = f64::from(step) / 5.0;
        let x = x_of(fraction);
        let ndcg = y_min + fraction * (1.0 - y_min);
        let y = y_of(ndcg);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{fraction:.1}</text>"##,
            TOP + plot_height,
            TOP + plot_height + 18.0
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{ndcg:.2}</text>"##,
            LEFT + plot_width,
            LEFT - 8.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_width}" height="{plot_height}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">exposure ratio (least / most exposed group per unit of relevance; 1 = fair)</text>"#,
        LEFT + plot_width / 2.0,
        HEIGHT - 22.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">NDCG@{k} against the unconstrained order</text>"#,
        TOP + plot_height / 2.0,
        TOP + plot_height / 2.0
    );
    if let Some(ratio) = baseline.exposure_ratio {
        let x = x_of(ratio);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" fill="#555">score order</text>"##,
            TOP + plot_height,
            x + 4.0,
            TOP + plot_height - 6.0
        );
    }
    // Labels go beside their point, at the first vertical offset where the text box stays
    // inside the frame and clear of every point and of the labels already placed (text width
    // estimated from the character count).
    let points: Vec<Option<(f64, f64)>> = rows
        .iter()
        .map(|row| {
            row.exposure_ratio
                .map(|ratio| (x_of(ratio), y_of(row.ndcg)))
        })
        .collect();
    let mut boxes: Vec<[f64; 4]> = points
        .iter()
        .flatten()
        .map(|&(x, y)| [x - 6.0, x + 6.0, y - 6.0, y + 6.0])
        .collect();
    for (index, row) in rows.iter().enumerate() {
        let Some((x, y)) = points[index] else {
            continue;
        };
        let color = COLORS[index % COLORS.len()];
        let label = xml_escape(&row.label);
        let width = 7.0 * row.label.chars().count() as f64;
        let (left, text_x, anchor) = if x + 8.0 + width > LEFT + plot_width - 2.0 {
            (x - 8.0 - width, x - 8.0, "end")
        } else {
            (x + 8.0, x + 8.0, "start")
        };
        let clear = |baseline: f64| {
            let (top, bottom) = (baseline - 10.0, baseline + 3.0);
            top >= TOP + 2.0
                && bottom <= TOP + plot_height - 2.0
                && !boxes
                    .iter()
                    .any(|&[box_left, box_right, box_top, box_bottom]| {
                        left < box_right
                            && box_left < left + width
                            && top < box_bottom
                            && box_top < bottom
                    })
        };
        let text_y = [
            4.0, -8.0, 17.0, -21.0, 30.0, -34.0, 43.0, -47.0, 56.0, -60.0,
        ]
        .iter()
        .map(|offset| y + offset)
        .find(|&baseline| clear(baseline))
        .unwrap_or(y + 4.0);
        boxes.push([left, left + width, text_y - 10.0, text_y + 3.0]);
        let _ = writeln!(
            svg,
            r#"<g class="point"><title>{label}: NDCG {:.4}, exposure ratio {:.4}</title><circle cx="{x:.1}" cy="{y:.1}" r="5" fill="{color}"/><text x="{text_x:.1}" y="{text_y:.1}" text-anchor="{anchor}" fill="{color}">{label}</text></g>"#,
            row.ndcg,
            row.exposure_ratio.unwrap_or(0.0),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(label: &str, ndcg: f64, ratio: Option<f64>) -> Summary {
        Summary {
            label: label.to_string(),
            spec: serde_json::json!({"name": label}),
            ndcg,
            exposure_ratio: ratio,
            amortized_exposure_ratio: ratio,
            ndkl: Some(0.1),
            awrf: None,
            true_ndcg: None,
            true_exposure_ratio: None,
            satisfied: 1.0,
            fallback: 0.0,
            rerank_micros: 1.0,
        }
    }

    #[test]
    fn chosen_rows_are_distinct_when_possible_and_reproducible() {
        let rows = choose_rows(50, 20, 3);
        let mut sorted = rows.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20);
        assert_eq!(rows, choose_rows(50, 20, 3));
        let more = choose_rows(4, 10, 3);
        assert_eq!(more.len(), 10);
        assert!(more.iter().all(|&row| row < 4));
    }

    #[test]
    fn amortized_ratio_divides_exposure_by_merit() {
        let exposure = BTreeMap::from([(0, 4.0), (1, 1.0)]);
        let merit = BTreeMap::from([(0, 2.0), (1, 1.0), (2, 0.0)]);
        assert_eq!(amortized_ratio(&exposure, &merit), Some(0.5));
        assert_eq!(amortized_ratio(&BTreeMap::new(), &merit), None);
    }

    #[test]
    fn reports_have_one_row_and_one_point_per_setting_and_escape_labels() {
        let rows = vec![
            summary("a<b", 0.9, Some(0.5)),
            summary("c,d", 0.8, Some(0.7)),
        ];
        let baseline = summary("none", 1.0, Some(0.3));
        let svg = svg_plot(10, &baseline, &rows);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("a&lt;b"));
        let csv = csv_report(&rows);
        assert_eq!(csv.lines().count(), 3);
        assert!(csv.contains("\"c,d\""));
        let markdown = markdown_report("test", 10, false, &baseline, &rows);
        assert_eq!(markdown.matches("\n| `").count(), 2);
    }
}
