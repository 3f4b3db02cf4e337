//! Argument checks shared by the scalar specification and the fast kernels (same errors).

use crate::error::KernelError;

/// Rejects `k == 0`.
#[inline]
pub(crate) fn check_k(k: usize) -> Result<(), KernelError> {
    match k {
        0 => Err(KernelError::ZeroK),
        _ => Ok(()),
    }
}

/// Checks that `query` has `dim` components, all finite; `which` names it in the error.
pub(crate) fn check_query(dim: usize, query: &[f32], which: usize) -> Result<(), KernelError> {
    if query.len() != dim {
        return Err(KernelError::DimMismatch {
            expected: dim,
            got: query.len(),
        });
    }
    match query.iter().position(|x| !x.is_finite()) {
        Some(component) => Err(KernelError::NonFiniteQuery {
            query: which,
            component,
        }),
        None => Ok(()),
    }
}

/// Checks that every candidate row index is below `rows`.
pub(crate) fn check_candidates(rows: usize, candidates: &[u32]) -> Result<(), KernelError> {
    // Branch-free reduction first (vectorizes); locate the culprit only on failure.
    let max = candidates.iter().copied().max().map_or(0, |m| m as usize);
    if candidates.is_empty() || max < rows {
        return Ok(());
    }
    match candidates.iter().position(|&c| c as usize >= rows) {
        Some(position) => Err(KernelError::CandidateOutOfRange {
            position,
            index: candidates[position],
            rows,
        }),
        None => Ok(()),
    }
}
