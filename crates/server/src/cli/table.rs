//! `fairrank table`: build synthetic tables, import NumPy files, inspect and verify table files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use store::{Table, TableRole, TableWriter};

/// `fairrank table` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TableCommand {
    /// Build a table from the deterministic synthetic generator (see datasets/README.md).
    Build(BuildArgs),
    /// Import item embeddings from a `.npy` file, with optional CSV metadata.
    Import(ImportArgs),
    /// Print a table's header, sections and statistics.
    Inspect(InspectArgs),
    /// Check a table's full data checksum.
    Verify(VerifyArgs),
}

/// Arguments of `fairrank table build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Use the synthetic generator (the only source for now; required so scripts stay explicit).
    #[arg(long, required = true)]
    pub synthetic: bool,
    /// Number of items.
    #[arg(long)]
    pub items: Option<usize>,
    /// Embedding dimension.
    #[arg(long)]
    pub dim: Option<usize>,
    /// Number of users in the user table (written with --users-out).
    #[arg(long)]
    pub users: Option<usize>,
    /// Number of item groups.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Share of items in the minority group(s).
    #[arg(long)]
    pub minority_share: Option<f64>,
    /// Power-law exponent of item popularity (the stored prior).
    #[arg(long)]
    pub popularity_exponent: Option<f64>,
    /// Strength of the latent bias against the minority group (0 turns it off).
    #[arg(long)]
    pub bias: Option<f64>,
    /// Seed of the generator.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where to write the item table (marked as an item table).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Where to write the user table (marked as a user table; not written without this flag).
    #[arg(long)]
    pub users_out: Option<PathBuf>,
}

/// The role `fairrank table import` marks its output with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportRole {
    /// Item embeddings: the table serves only as the item table.
    Items,
    /// User embeddings: the table serves only as the user table.
    Users,
    /// No mark: the table serves in either role, and readers older than the role flags
    /// can read it.
    Unmarked,
}

impl ImportRole {
    fn role(self) -> Option<TableRole> {
        match self {
            ImportRole::Items => Some(TableRole::Items),
            ImportRole::Users => Some(TableRole::Users),
            ImportRole::Unmarked => None,
        }
    }
}

/// Arguments of `fairrank table import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Item embeddings: a 2-D float32/float64 C-order `.npy` file.
    #[arg(long)]
    pub npy: PathBuf,
    /// Optional CSV with an `id` column, integer group label columns and an optional `prior` column.
    #[arg(long)]
    pub meta: Option<PathBuf>,
    /// Where to write the table.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// What the rows are, marked in the table's header: a marked table is refused in the
    /// other role (by `serve`, reloads, `topk` and `eval`).
    #[arg(long, value_enum, default_value_t = ImportRole::Items)]
    pub role: ImportRole,
}

/// Arguments of `fairrank table inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The table file.
    pub file: PathBuf,
    /// Print JSON instead of readable text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fairrank table verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The table file.
    pub file: PathBuf,
}

/// Runs a `fairrank table` subcommand.
pub fn run(command: TableCommand) -> anyhow::Result<()> {
    match command {
        TableCommand::Build(args) => build(&args),
        TableCommand::Import(args) => import(&args),
        TableCommand::Inspect(args) => inspect(&args),
        TableCommand::Verify(args) => verify(&args.file),
    }
}

fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let mut params = datasets::SyntheticParams::default();
    if let Some(items) = args.items {
        params.items = items;
    }
    if let Some(dim) = args.dim {
        params.dim = dim;
    }
    if let Some(users) = args.users {
        params.users = users;
    }
    if let Some(groups) = args.groups {
        params.groups = groups;
    }
    if let Some(share) = args.minority_share {
        params.minority_share = share;
    }
    if let Some(exponent) = args.popularity_exponent {
        params.popularity_exponent = exponent;
    }
    if let Some(bias) = args.bias {
        params.bias = bias;
    }
    if let Some(seed) = args.seed {
        params.seed = seed;
    }
    let dataset = datasets::generate(&params)?;
    let summary = TableWriter::new()
        .role(TableRole::Items)
        .write(&args.output, &dataset.items)?;
    println!(
        "{}: {} items x {} dims, {} bytes",
        args.output.display(),
        summary.rows,
        summary.dim,
        summary.file_bytes
    );
    if let Some(users_out) = &args.users_out {
        let summary = TableWriter::new()
            .role(TableRole::Users)
            .write(users_out, &dataset.users)?;
        println!(
            "{}: {} users x {} dims, {} bytes",
            users_out.display(),
            summary.rows,
            summary.dim,
            summary.file_bytes
        );
    }
    Ok(())
}

fn import(args: &ImportArgs) -> anyhow::Result<()> {
    let data = datasets::import_npy(&args.npy, args.meta.as_deref())?;
    let role = args.role.role();
    let summary = TableWriter::new()
        .maybe_role(role)
        .write(&args.output, &data)?;
    println!(
        "{}: {} {} x {} dims, {} bytes",
        args.output.display(),
        summary.rows,
        role.map_or("rows", TableRole::name),
        summary.dim,
        summary.file_bytes
    );
    Ok(())
}

fn verify(path: &Path) -> anyhow::Result<()> {
    let table = Table::open(path)?;
    table.verify()?;
    println!(
        "{}: ok ({} rows x {} dims, checksum verified)",
        path.display(),
        table.len(),
        table.dim()
    );
    Ok(())
}

/// Statistics of one table, as printed by `fairrank table inspect`.
#[derive(Debug, serde::Serialize)]
struct Inspection {
    file: String,
    file_bytes: u64,
    /// What the rows are: `items`, `users` or `unmarked`.
    role: &'static str,
    rows: usize,
    dim: usize,
    row_stride: usize,
    max_row_norm: f32,
    mean_row_norm: f64,
    header: serde_json::Value,
    group_attributes: BTreeMap<String, BTreeMap<u32, usize>>,
    prior: Option<PriorStats>,
    dim_names: Option<Vec<String>>,
}

#[derive(Debug, serde::Serialize)]
struct PriorStats {
    min: f32,
    max: f32,
    mean: f64,
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let table = Table::open(&args.file)?;
    let file_bytes = std::fs::metadata(&args.file)
        .with_context(|| format!("{}: cannot read metadata", args.file.display()))?
        .len();
    let mean_row_norm = if table.is_empty() {
        0.0
    } else {
        (0..table.len())
            .map(|row| kernels::dot(table.row(row), table.row(row)).sqrt() as f64)
            .sum::<f64>()
            / table.len() as f64
    };
    let mut group_attributes = BTreeMap::new();
    for (attribute, name) in table.group_attribute_names().iter().enumerate() {
        let mut counts = BTreeMap::new();
        for &label in table.group_labels(attribute) {
            *counts.entry(label).or_insert(0usize) += 1;
        }
        group_attributes.insert(name.clone(), counts);
    }
    let prior = table
        .prior()
        .filter(|prior| !prior.is_empty())
        .map(|prior| PriorStats {
            min: prior.iter().copied().fold(f32::INFINITY, f32::min),
            max: prior.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            mean: prior.iter().map(|&value| value as f64).sum::<f64>() / prior.len() as f64,
        });
    let inspection = Inspection {
        file: args.file.display().to_string(),
        file_bytes,
        role: role_name(table.role()),
        rows: table.len(),
        dim: table.dim(),
        row_stride: table.row_stride(),
        max_row_norm: table.max_row_norm(),
        mean_row_norm,
        header: header_json(&table),
        group_attributes,
        prior,
        dim_names: table.dim_names().map(<[String]>::to_vec),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inspection)?);
    } else {
        print_inspection(&inspection);
    }
    Ok(())
}

fn print_inspection(inspection: &Inspection) {
    println!("file:           {}", inspection.file);
    println!("file bytes:     {}", inspection.file_bytes);
    println!("role:           {}", inspection.role);
    println!("rows:           {}", inspection.rows);
    println!("dim:            {}", inspection.dim);
    println!("row stride:     {} f32", inspection.row_stride);
    println!("max row norm:   {}", inspection.max_row_norm);
    println!("mean row norm:  {:.6}", inspection.mean_row_norm);
    println!("header:");
    if let serde_json::Value::Object(fields) = &inspection.header {
        for (name, value) in fields.iter().filter(|(name, _)| name.as_str() != "regions") {
            println!("  {name}: {value}");
        }
        if let Some(serde_json::Value::Array(regions)) = fields.get("regions") {
            println!("sections:");
            println!("  {:<20} {:>14} {:>14}", "region", "offset", "length");
            for region in regions {
                println!(
                    "  {:<20} {:>14} {:>14}",
                    region["name"].as_str().unwrap_or_default(),
                    region["offset"],
                    region["length"]
                );
            }
        }
    }
    if inspection.group_attributes.is_empty() {
        println!("group attributes: none");
    }
    for (name, counts) in &inspection.group_attributes {
        let described: Vec<String> = counts
            .iter()
            .map(|(label, count)| {
                let share = *count as f64 / inspection.rows.max(1) as f64;
                format!("{label}: {count} ({:.1}%)", share * 100.0)
            })
            .collect();
        println!("group attribute {name}: {}", described.join(", "));
    }
    match &inspection.prior {
        Some(prior) => println!(
            "prior:          min {} max {} mean {:.6}",
            prior.min, prior.max, prior.mean
        ),
        None => println!("prior:          none"),
    }
    match &inspection.dim_names {
        Some(names) => println!("dim names:      {}", names.join(", ")),
        None => println!("dim names:      none"),
    }
}

/// A table's role as `inspect` shows it: `items`, `users` or `unmarked`.
fn role_name(role: Option<TableRole>) -> &'static str {
    role.map_or("unmarked", TableRole::name)
}

/// The header fields and the byte ranges of every region, for `inspect`.
fn header_json(table: &Table) -> serde_json::Value {
    let header = table.header();
    let stats = table.stats();
    let regions: Vec<serde_json::Value> = stats
        .regions
        .iter()
        .map(|region| {
            serde_json::json!({
                "name": region.name,
                "offset": region.range.offset,
                "length": region.range.length,
            })
        })
        .collect();
    serde_json::json!({
        "format_version": header.format_version,
        "header_size": header.header_size,
        "dtype": header.dtype.name(),
        "dim": header.dim,
        "row_count": header.row_count,
        "row_stride_bytes": header.row_stride_bytes,
        "rows_offset": header.rows_offset,
        "rows_length": header.rows_length,
        "group_attribute_count": header.group_attribute_count,
        "has_prior": header.has_prior,
        "has_dim_names": header.has_dim_names,
        "max_row_norm": header.max_row_norm,
        "file_size": header.file_size,
        "data_checksum": format!("{:016x}", header.data_checksum),
        "header_checksum": format!("{:016x}", header.header_checksum),
        "regions": regions,
        "row_padding_bytes": stats.row_padding_bytes,
        "gap_bytes": stats.gap_bytes,
        "id_index_heap_bytes": stats.id_index_heap_bytes,
    })
}
