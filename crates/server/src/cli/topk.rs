//! `fairrank topk`: exact top-k of each query over a table, as JSON lines or a readable table.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use engine::TableKind;
use kernels::{RowMatrix, ScoredItem, TopKScratch};
use store::Table;

/// Output formats of `fairrank topk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per query and line: `{"query": i, "ids": [...], "scores": [...]}`.
    Json,
    /// A readable table.
    Table,
}

/// Arguments of `fairrank topk`.
#[derive(Debug, clap::Args)]
pub struct TopkArgs {
    /// Item table file; without it, the built-in default dataset (generated on first use).
    #[arg(long)]
    pub table: Option<PathBuf>,
    /// Queries as a 2-D float32/float64 `.npy` file, one query per row. Without it, the first
    /// `--limit` rows of the user table (`--users`, or the default dataset's users) are the queries.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// User table whose rows serve as queries when `--queries` is not given.
    #[arg(long)]
    pub users: Option<PathBuf>,
    /// How many user rows to use as queries when `--queries` is not given.
    #[arg(long, default_value_t = 5)]
    pub limit: usize,
    /// Number of items to return per query.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    pub format: OutputFormat,
}

/// Queries gathered into one row-major matrix.
struct Queries {
    source: String,
    rows: usize,
    dim: usize,
    data: Vec<f32>,
}

/// Runs `fairrank topk`.
pub fn run(args: &TopkArgs) -> anyhow::Result<()> {
    if args.k == 0 {
        bail!("--k must be at least 1");
    }
    let default_dataset =
        if args.table.is_none() || (args.queries.is_none() && args.users.is_none()) {
            Some(datasets::default_dataset().context("preparing the built-in default dataset")?)
        } else {
            None
        };
    let table_path = args
        .table
        .clone()
        .or_else(|| {
            default_dataset
                .as_ref()
                .map(|dataset| dataset.items.clone())
        })
        .context("no --table given and no default dataset")?;
    let table = super::open_in_role(TableKind::Items, &table_path)?;
    let queries = load_queries(args, default_dataset.as_ref())?;
    if queries.dim != table.dim() {
        bail!(
            "{}: queries have dimension {}, but table {} has dimension {}",
            queries.source,
            queries.dim,
            table_path.display(),
            table.dim()
        );
    }
    let results = exact_topk(&table, &queries, args.k)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    match args.format {
        OutputFormat::Json => write_json(&mut out, &table, &results)?,
        OutputFormat::Table => write_table(&mut out, &table, &results)?,
    }
    out.flush()?;
    Ok(())
}

fn load_queries(
    args: &TopkArgs,
    default_dataset: Option<&datasets::DefaultDataset>,
) -> anyhow::Result<Queries> {
    if let Some(path) = &args.queries {
        let matrix = datasets::read_npy(path)?;
        let queries = Queries {
            source: path.display().to_string(),
            rows: matrix.rows,
            dim: matrix.dim,
            data: matrix.data,
        };
        check_finite(&queries)?;
        return Ok(queries);
    }
    let users_path = match (&args.users, default_dataset) {
        (Some(path), _) => path.clone(),
        (None, Some(dataset)) => dataset.users.clone(),
        (None, None) => bail!("give --queries Q.npy or --users FILE"),
    };
    let users = super::open_in_role(TableKind::Users, &users_path)?;
    let rows = args.limit.min(users.len());
    if rows == 0 {
        bail!("{}: no user rows to use as queries", users_path.display());
    }
    let mut data = Vec::with_capacity(rows * users.dim());
    for row in 0..rows {
        data.extend_from_slice(users.row(row));
    }
    Ok(Queries {
        source: users_path.display().to_string(),
        rows,
        dim: users.dim(),
        data,
    })
}

fn check_finite(queries: &Queries) -> anyhow::Result<()> {
    if let Some(position) = queries.data.iter().position(|value| !value.is_finite()) {
        bail!(
            "{}: query {} has a non-finite value at dimension {}",
            queries.source,
            position / queries.dim.max(1),
            position % queries.dim.max(1)
        );
    }
    Ok(())
}

/// Exact top-k of every query: the batched kernel for several queries, the parallel scan for one.
fn exact_topk(table: &Table, queries: &Queries, k: usize) -> anyhow::Result<Vec<Vec<ScoredItem>>> {
    let items = RowMatrix::new(table.rows(), table.len(), table.dim(), table.row_stride())?;
    if queries.rows >= 4 {
        let query_matrix = RowMatrix::new(&queries.data, queries.rows, queries.dim, queries.dim)?;
        let mut results = Vec::new();
        kernels::batch_topk(items, query_matrix, k, &mut results)?;
        return Ok(results);
    }
    let mut scratch = TopKScratch::new();
    let mut results = Vec::with_capacity(queries.rows);
    for query in queries.data.chunks_exact(queries.dim) {
        let mut best = Vec::new();
        if table.len() >= 65_536 {
            kernels::par_scan_topk(items, query, k, &mut best)?;
        } else {
            kernels::scan_topk(items, query, k, &mut scratch, &mut best)?;
        }
        results.push(best);
    }
    Ok(results)
}

fn write_json(
    out: &mut impl Write,
    table: &Table,
    results: &[Vec<ScoredItem>],
) -> anyhow::Result<()> {
    for (query, best) in results.iter().enumerate() {
        let ids: Vec<&str> = best
            .iter()
            .map(|item| table.id(item.index as usize))
            .collect();
        let scores: Vec<f32> = best.iter().map(|item| item.score).collect();
        let line = serde_json::json!({ "query": query, "ids": ids, "scores": scores });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn write_table(
    out: &mut impl Write,
    table: &Table,
    results: &[Vec<ScoredItem>],
) -> anyhow::Result<()> {
    let id_width = results
        .iter()
        .flatten()
        .map(|item| table.id(item.index as usize).len())
        .max()
        .unwrap_or(2)
        .max(2);
    writeln!(
        out,
        "{:>5}  {:>4}  {:<id_width$}  {:>12}",
        "query", "rank", "id", "score"
    )?;
    for (query, best) in results.iter().enumerate() {
        for (rank, item) in best.iter().enumerate() {
            writeln!(
                out,
                "{:>5}  {:>4}  {:<id_width$}  {:>12.6}",
                query,
                rank + 1,
                table.id(item.index as usize),
                item.score
            )?;
        }
    }
    Ok(())
}
