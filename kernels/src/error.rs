//! The one error type of the `kernels` crate: every refusal a kernel can make, with a clear message.

use thiserror::Error;

/// Why a kernel refused its input.
///
/// Kernels validate their arguments up front and never panic on bad input; each variant names
/// the offending value so that callers (the engine, the CLI) can report it verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A top-k request asked for zero items.
    #[error("k must be at least 1 (got k = 0)")]
    ZeroK,

    /// A vector's length does not match the matrix dimension.
    #[error("dimension mismatch: expected {expected} components, got {got}")]
    DimMismatch {
        /// The matrix dimension.
        expected: usize,
        /// The length that was supplied.
        got: usize,
    },

    /// The row stride is smaller than the row dimension, so rows would overlap.
    #[error("row stride {stride} is smaller than the dimension {dim}")]
    StrideTooSmall {
        /// The requested stride, in `f32` elements.
        stride: usize,
        /// The requested dimension.
        dim: usize,
    },

    /// The backing slice is too short for the requested shape.
    #[error(
        "matrix data too short: {rows} rows of dimension {dim} with stride {stride} need \
         {needed} floats, got {got}"
    )]
    DataTooShort {
        /// Number of rows requested.
        rows: usize,
        /// Row dimension requested.
        dim: usize,
        /// Row stride requested.
        stride: usize,
        /// Minimum number of `f32` elements the shape needs.
        needed: usize,
        /// Number of `f32` elements supplied.
        got: usize,
    },

    /// A dense matrix's data length is not a positive multiple of its dimension.
    #[error("data length {len} is not a multiple of the (positive) dimension {dim}")]
    RaggedData {
        /// Number of `f32` elements supplied.
        len: usize,
        /// The requested dimension.
        dim: usize,
    },

    /// The shape's size computation overflows `usize`.
    #[error("matrix shape overflows: {rows} rows with stride {stride}")]
    ShapeOverflow {
        /// Number of rows requested.
        rows: usize,
        /// Row stride requested.
        stride: usize,
    },

    /// The matrix has more rows than a `u32` row index can address.
    #[error("matrix has {rows} rows; at most {max} are supported (row indices are u32)")]
    TooManyRows {
        /// Number of rows requested.
        rows: usize,
        /// The largest supported row count.
        max: usize,
    },

    /// A candidate row index is outside the matrix.
    #[error("candidate #{position} has row index {index}, but the matrix has {rows} rows")]
    CandidateOutOfRange {
        /// Position of the offending entry in the candidate list.
        position: usize,
        /// The offending row index.
        index: u32,
        /// Number of rows in the matrix.
        rows: usize,
    },

    /// A query vector contains NaN or an infinity.
    #[error("query {query} has a non-finite component at position {component}")]
    NonFiniteQuery {
        /// Which query (0 for single-query kernels).
        query: usize,
        /// Index of the first non-finite component.
        component: usize,
    },

    /// Memory for a matrix could not be obtained.
    #[error("could not allocate {bytes} bytes: {reason}")]
    Allocation {
        /// Number of bytes requested.
        bytes: usize,
        /// The underlying error message.
        reason: String,
    },

    /// A kernel path was requested that this CPU or shape cannot run.
    #[error("the {path} path is not available on this CPU for this shape")]
    PathUnavailable {
        /// Name of the requested path.
        path: &'static str,
    },

    /// A quantized copy of rows is used with a matrix it was not built from.
    #[error(
        "the quantized rows ({quantized_rows} rows of dimension {quantized_dim}) were not built \
         from this matrix ({rows} rows of dimension {dim})"
    )]
    QuantizedMismatch {
        /// Rows of the quantized copy.
        quantized_rows: usize,
        /// Dimension of the quantized copy.
        quantized_dim: usize,
        /// Rows of the matrix.
        rows: usize,
        /// Dimension of the matrix.
        dim: usize,
    },

    /// A thread pool could not be created.
    #[error("could not build a thread pool with {threads} threads: {reason}")]
    ThreadPool {
        /// Number of threads requested.
        threads: usize,
        /// The underlying error message.
        reason: String,
    },
}
