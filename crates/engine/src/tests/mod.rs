//! End-to-end tests of the engine over small tables written with `store::write_table`.

mod fairness_stage;
mod privacy;
mod reload;
mod request_path;
pub(crate) mod util;
mod validation;
