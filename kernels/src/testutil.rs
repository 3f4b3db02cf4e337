//! Test helpers: seeded random data (row padding poisoned with NaN) and tolerant comparison of
//! fast top-k results with the scalar specification.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::topk::{ScoredItem, sort_ranked};

/// `len` uniform floats in [-1, 1) from `seed`.
pub(crate) fn random_vec(seed: u64, len: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `rows` rows of `dim` uniform floats, `stride` apart; padding floats are NaN so that any
/// kernel reading them would produce visibly wrong scores.
pub(crate) fn random_rows(seed: u64, rows: usize, dim: usize, stride: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![f32::NAN; rows * stride];
    for row in data.chunks_mut(stride.max(1)).take(rows) {
        for x in &mut row[..dim] {
            *x = rng.random_range(-1.0f32..1.0);
        }
    }
    data
}

/// Like [`random_rows`] but with small integers in `-4..=4`: every dot product of such
/// vectors (dim <= 1000) is exact in `f32`, so all paths must agree exactly, ties included.
pub(crate) fn integer_rows(seed: u64, rows: usize, dim: usize, stride: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![f32::NAN; rows * stride];
    for row in data.chunks_mut(stride.max(1)).take(rows) {
        for x in &mut row[..dim] {
            *x = f32::from(rng.random_range(-4i8..=4));
        }
    }
    data
}

/// A bound on |fast - scalar| for a dot product of `a` and `b` whatever the summation order:
/// (n + 2) * eps * sum |a_i * b_i| (recursive summation error bound, plus slack).
pub(crate) fn dot_tolerance(a: &[f32], b: &[f32]) -> f32 {
    let abs_sum: f64 = a.iter().zip(b).map(|(x, y)| f64::from((x * y).abs())).sum();
    ((a.len().min(b.len()) as f64 + 2.0) * f64::from(f32::EPSILON) * abs_sum) as f32 + 1e-30
}

/// One entry of the specification: a row, its scalar score and the rounding tolerance.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpecScore {
    pub index: u32,
    pub score: f32,
    pub tolerance: f32,
}

/// Checks a fast top-k list against the scalar scores of every eligible row (`spec`, unique
/// indices), allowing rounding differences: lengths match, the list is strictly ordered,
/// each score is within tolerance of its row's scalar score, the i-th score is within
/// tolerance of the i-th scalar score, and items may swap across the cut only with items
/// whose scalar score is within tolerance of the k-th scalar score.
pub(crate) fn check_topk(spec: &[SpecScore], fast: &[ScoredItem], k: usize) -> Result<(), String> {
    let expected_len = k.min(spec.len());
    if fast.len() != expected_len {
        return Err(format!("length {} != expected {expected_len}", fast.len()));
    }
    if expected_len == 0 {
        return Ok(());
    }
    for pair in fast.windows(2) {
        if !pair[0].ranks_before(&pair[1]) {
            return Err(format!(
                "not strictly ranked: {:?} then {:?}",
                pair[0], pair[1]
            ));
        }
    }
    let max_tol = spec.iter().map(|s| s.tolerance).fold(0.0f32, f32::max);
    let lookup = |index: u32| spec.iter().find(|s| s.index == index);
    let mut ranked: Vec<ScoredItem> = spec
        .iter()
        .map(|s| ScoredItem::new(s.index, s.score))
        .collect();
    sort_ranked(&mut ranked);
    let cut = ranked[expected_len - 1].score;
    for (i, item) in fast.iter().enumerate() {
        let Some(s) = lookup(item.index) else {
            return Err(format!("item {item:?} is not an eligible row"));
        };
        if (item.score - s.score).abs() > s.tolerance {
            return Err(format!(
                "item {item:?}: scalar score {} (tol {})",
                s.score, s.tolerance
            ));
        }
        if (item.score - ranked[i].score).abs() > max_tol {
            return Err(format!(
                "rank {i}: {} vs scalar {}",
                item.score, ranked[i].score
            ));
        }
        if s.score < cut - 2.0 * max_tol {
            return Err(format!("item {item:?} is far below the scalar cut {cut}"));
        }
    }
    for missing in ranked[..expected_len]
        .iter()
        .filter(|r| !fast.iter().any(|f| f.index == r.index))
    {
        if missing.score > cut + 2.0 * max_tol {
            return Err(format!(
                "scalar item {missing:?} missing although above the cut {cut}"
            ));
        }
    }
    Ok(())
}

/// Scalar scores with tolerances for the given rows of a matrix.
pub(crate) fn spec_scores(
    m: crate::RowMatrix<'_>,
    query: &[f32],
    rows: impl IntoIterator<Item = u32>,
) -> Vec<SpecScore> {
    rows.into_iter()
        .map(|index| {
            let row = m.row(index as usize);
            SpecScore {
                index,
                score: crate::scalar::dot(row, query),
                tolerance: dot_tolerance(row, query),
            }
        })
        .collect()
}
