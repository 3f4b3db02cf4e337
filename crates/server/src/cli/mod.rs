//! Subcommands of the `fairrank` binary other than `serve`: local file tools (no server
//! needed) and the `rank` client of a running server.

pub mod constraint_spec;
pub mod eval;
pub mod fair;
pub mod ledger;
pub mod privacy;
pub mod rank;
pub mod rerank;
pub mod table;
pub mod topk;

/// Opens the item or user table of an offline command (`topk`, `eval`) with the checks of
/// the server's start: a table whose header marks it with the other role is refused, naming
/// the file and both roles (an unmarked table is accepted in either role).
pub fn open_in_role(
    kind: engine::TableKind,
    path: &std::path::Path,
) -> anyhow::Result<store::Table> {
    let table = store::Table::open(path)?;
    if let Err(message) = engine::role_problem(kind, &table) {
        anyhow::bail!("{message}");
    }
    Ok(table)
}

/// Formats a measured figure with enough significant digits to compare runs.
pub fn format_figure(value: f64) -> String {
    if value != 0.0 && (value.abs() >= 1e6 || value.abs() < 1e-3) {
        format!("{value:.4e}")
    } else {
        format!("{value:.4}")
    }
}
