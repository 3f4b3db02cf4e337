//! Subcommands of the `fairrank` binary that work on local files (no server needed).

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
