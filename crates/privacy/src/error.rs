//! The error type of the `privacy` crate: every refusal names the offending input.

/// Everything that can go wrong in calibration, accounting, sampling or selection.
///
/// All variants come from bad input or from the operating system's random source; none
/// signals an internal failure that a caller could not have avoided.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PrivacyError {
    /// A numeric parameter is outside its valid range.
    #[error("invalid {name} = {value}: {requirement}")]
    InvalidParameter {
        /// Parameter name as the caller knows it (e.g. `epsilon`).
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// What a valid value looks like.
        requirement: &'static str,
    },
    /// A score handed to a selection mechanism is NaN or infinite.
    #[error("score at index {index} is not finite ({value})")]
    NonFiniteScore {
        /// Position of the score in the slice.
        index: usize,
        /// The rejected score.
        value: f32,
    },
    /// An embedding component is NaN or infinite.
    #[error("embedding component {index} is not finite ({value})")]
    NonFiniteEmbedding {
        /// Position of the component.
        index: usize,
        /// The rejected component.
        value: f32,
    },
    /// The embedding dimension is too large for the f32 rounding-error bound to hold.
    #[error(
        "embedding dimension {dim} is too large for the f32 dot-product error bound \
         (must be between 1 and {max})"
    )]
    DimensionOutOfRange {
        /// The rejected dimension.
        dim: usize,
        /// The largest supported dimension.
        max: usize,
    },
    /// The grid exponent `k` (grid spacing `2^-k`) is outside the supported range.
    #[error("grid exponent k = {grid_k} is outside the supported range {min}..={max}")]
    GridOutOfRange {
        /// The rejected exponent.
        grid_k: i32,
        /// Smallest supported exponent.
        min: i32,
        /// Largest supported exponent.
        max: i32,
    },
    /// A value to release cannot be represented exactly on the requested grid.
    #[error(
        "value {value} does not fit the 2^-{grid_k} grid: |value| * 2^k must be at most 2^52; \
         use a coarser grid (smaller k)"
    )]
    ValueOutOfGridRange {
        /// The rejected value.
        value: f64,
        /// The grid exponent.
        grid_k: i32,
    },
    /// A noise parameter, measured in grid units, is outside what exact integer sampling supports.
    #[error("{name} in grid units = {value} is outside the supported range {min}..={max}: {hint}")]
    NoiseOutOfGridRange {
        /// Which parameter (`scale` or `sigma`).
        name: &'static str,
        /// The parameter multiplied by `2^k`.
        value: f64,
        /// Smallest supported value in grid units.
        min: f64,
        /// Largest supported value in grid units.
        max: f64,
        /// How to fix it.
        hint: &'static str,
    },
    /// The operating system's random source failed while seeding a generator.
    #[error("the operating system random source failed: {0}")]
    OsRandomness(String),
    /// A numerical search (calibration or conversion) failed to bracket its answer.
    #[error("numerical search failed: {0}")]
    NoConvergence(&'static str),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, PrivacyError>;

/// Checks that `value` is finite and strictly positive.
pub(crate) fn require_positive(name: &'static str, value: f64) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(PrivacyError::InvalidParameter {
            name,
            value,
            requirement: "must be finite and greater than 0",
        })
    }
}

/// Checks that `value` is finite and non-negative.
pub(crate) fn require_non_negative(name: &'static str, value: f64) -> Result<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(PrivacyError::InvalidParameter {
            name,
            value,
            requirement: "must be finite and at least 0",
        })
    }
}

/// Checks that `value` is a probability strictly between 0 and 1.
pub(crate) fn require_open_unit(name: &'static str, value: f64) -> Result<f64> {
    if value > 0.0 && value < 1.0 {
        Ok(value)
    } else {
        Err(PrivacyError::InvalidParameter {
            name,
            value,
            requirement: "must be strictly between 0 and 1",
        })
    }
}
