//! Subcommands of the `fairrank` binary other than `serve`: local file tools (no server
//! needed) and the `rank` client of a running server.

pub mod constraint_spec;
pub mod eval;
pub mod fair;
pub mod privacy;
pub mod rank;
pub mod rerank;
pub mod table;
pub mod topk;

/// Formats a measured figure with enough significant digits to compare runs.
pub fn format_figure(value: f64) -> String {
    if value != 0.0 && (value.abs() >= 1e6 || value.abs() < 1e-3) {
        format!("{value:.4e}")
    } else {
        format!("{value:.4}")
    }
}
