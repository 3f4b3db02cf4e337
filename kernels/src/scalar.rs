//! The specification: plain scalar implementations of every kernel, written for clarity.
//!
//! Each fast kernel (SIMD, parallel, batched) is property-tested against the function of the
//! same name here. Scores are sums of products accumulated left to right in `f32`; results
//! are ordered by [`crate::ScoredItem::rank_cmp`]: score descending, ties broken by row index
//! ascending. Fast kernels agree with these up to floating-point rounding, and return
//! exactly the same errors for the same arguments.

use crate::error::KernelError;
use crate::matrix::RowMatrix;
use crate::topk::{ScoredItem, sort_ranked};
use crate::validate::{check_candidates, check_k, check_query};

/// Dot product over the common prefix of `a` and `b`, summed left to right.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |acc, (x, y)| acc + x * y)
}

/// The best `k` rows of `m` for `query`, best first (all rows if `k >= m.rows()`).
pub fn scan_topk(
    m: RowMatrix<'_>,
    query: &[f32],
    k: usize,
) -> Result<Vec<ScoredItem>, KernelError> {
    check_k(k)?;
    check_query(m.dim(), query, 0)?;
    let mut all: Vec<ScoredItem> = (0..m.rows())
        .map(|i| ScoredItem::new(i as u32, dot(m.row(i), query)))
        .collect();
    sort_ranked(&mut all);
    all.truncate(k);
    Ok(all)
}

/// Scores of the candidate rows, in candidate order (`out[i]` scores `candidates[i]`).
pub fn score_candidates(
    m: RowMatrix<'_>,
    query: &[f32],
    candidates: &[u32],
) -> Result<Vec<f32>, KernelError> {
    check_query(m.dim(), query, 0)?;
    check_candidates(m.rows(), candidates)?;
    Ok(candidates
        .iter()
        .map(|&c| dot(m.row(c as usize), query))
        .collect())
}

/// The best `k` of the candidate rows, best first; `ScoredItem::index` is the row index.
///
/// A row listed twice is scored twice and may appear twice.
pub fn candidates_topk(
    m: RowMatrix<'_>,
    query: &[f32],
    candidates: &[u32],
    k: usize,
) -> Result<Vec<ScoredItem>, KernelError> {
    check_k(k)?;
    check_query(m.dim(), query, 0)?;
    check_candidates(m.rows(), candidates)?;
    let mut all: Vec<ScoredItem> = candidates
        .iter()
        .map(|&c| ScoredItem::new(c, dot(m.row(c as usize), query)))
        .collect();
    sort_ranked(&mut all);
    all.truncate(k);
    Ok(all)
}

/// [`scan_topk`] for each row of `queries`; `result[q]` answers query `q`.
pub fn batch_topk(
    m: RowMatrix<'_>,
    queries: RowMatrix<'_>,
    k: usize,
) -> Result<Vec<Vec<ScoredItem>>, KernelError> {
    check_k(k)?;
    if queries.dim() != m.dim() {
        return Err(KernelError::DimMismatch {
            expected: m.dim(),
            got: queries.dim(),
        });
    }
    for q in 0..queries.rows() {
        check_query(m.dim(), queries.row(q), q)?;
    }
    (0..queries.rows())
        .map(|q| scan_topk(m, queries.row(q), k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (Vec<f32>, usize, usize) {
        // 4 rows of dim 2, stride 3 (padding is NaN and must never be read).
        let nan = f32::NAN;
        (
            vec![1.0, 0.0, nan, 0.0, 1.0, nan, 1.0, 1.0, nan, -1.0, 0.0],
            2,
            3,
        )
    }

    #[test]
    fn scan_orders_by_score_then_index() {
        let (data, dim, stride) = table();
        let m = RowMatrix::new(&data, 4, dim, stride).unwrap();
        let top = scan_topk(m, &[1.0, 1.0], 3).unwrap();
        assert_eq!(
            top,
            vec![
                ScoredItem::new(2, 2.0),
                ScoredItem::new(0, 1.0),
                ScoredItem::new(1, 1.0)
            ]
        );
        assert_eq!(scan_topk(m, &[1.0, 1.0], 10).unwrap().len(), 4);
    }

    #[test]
    fn errors_are_typed() {
        let (data, dim, stride) = table();
        let m = RowMatrix::new(&data, 4, dim, stride).unwrap();
        assert_eq!(scan_topk(m, &[1.0, 1.0], 0), Err(KernelError::ZeroK));
        assert_eq!(
            scan_topk(m, &[1.0], 1),
            Err(KernelError::DimMismatch {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            scan_topk(m, &[1.0, f32::INFINITY], 1),
            Err(KernelError::NonFiniteQuery {
                query: 0,
                component: 1
            })
        );
        assert_eq!(
            candidates_topk(m, &[1.0, 1.0], &[0, 4], 1),
            Err(KernelError::CandidateOutOfRange {
                position: 1,
                index: 4,
                rows: 4
            })
        );
    }

    #[test]
    fn candidates_keep_row_indices() {
        let (data, dim, stride) = table();
        let m = RowMatrix::new(&data, 4, dim, stride).unwrap();
        assert_eq!(
            score_candidates(m, &[2.0, 1.0], &[3, 1]).unwrap(),
            vec![-2.0, 1.0]
        );
        let top = candidates_topk(m, &[1.0, 1.0], &[3, 1, 0], 2).unwrap();
        assert_eq!(top, vec![ScoredItem::new(0, 1.0), ScoredItem::new(1, 1.0)]);
    }
}
