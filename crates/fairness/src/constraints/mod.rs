//! The built-in constraints, one file per published algorithm.

pub mod det;
pub mod fair;
pub mod fairco;
pub mod min_exposure;
pub mod mtable;
pub mod none;
pub mod plackett_luce;
