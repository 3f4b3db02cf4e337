//! Candidates, the pool contract, position weights and share arithmetic shared by all constraints.

use std::sync::OnceLock;

use crate::error::FairnessError;

/// One candidate in the pool handed to a re-ranker.
///
/// The pool is the unconstrained ranking: position 0 is the best candidate and scores are
/// finite and non-increasing (checked by [`validate_pool`]). Under differential privacy the
/// scores are pseudo-scores derived from the released order, never the raw scores.
///
/// `group` is the value of the one group attribute the policy chose for this request (for
/// example gender, or provider tier); items with several sensitive attributes are re-ranked
/// on one attribute at a time. The scoring kernel never sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Caller's identifier (item index or pool-local id); carried through untouched.
    pub id: u32,
    /// Relevance score or pseudo-score; higher is better.
    pub score: f32,
    /// Group label of the item for the attribute the policy selected.
    pub group: u32,
}

impl Candidate {
    /// A candidate with the given id, score and group label.
    pub fn new(id: u32, score: f32, group: u32) -> Self {
        Self { id, score, group }
    }
}

/// Checks the pool contract: every score is finite and scores never increase with position.
///
/// Runs in O(n) without allocating; every built-in re-ranker calls it first.
pub fn validate_pool(pool: &[Candidate]) -> Result<(), FairnessError> {
    // Branch-free pass for the common valid case; the slow pass below names the culprit.
    let mut previous = f32::INFINITY;
    let mut bad = false;
    for candidate in pool {
        let score = candidate.score;
        bad |= (score > previous) | !score.is_finite();
        previous = score;
    }
    if !bad {
        return Ok(());
    }
    let mut previous = f32::INFINITY;
    for (position, candidate) in pool.iter().enumerate() {
        let score = candidate.score;
        if !score.is_finite() {
            return Err(FairnessError::InvalidPool {
                position,
                reason: format!("score {score} is not finite"),
            });
        }
        if score > previous {
            return Err(FairnessError::InvalidPool {
                position,
                reason: format!(
                    "pool must be in non-increasing score order, but score {score} follows {previous}"
                ),
            });
        }
        previous = score;
    }
    Ok(())
}

/// Number of ranks whose DCG weight is precomputed.
const DCG_TABLE_LEN: usize = 4096;

fn dcg_table() -> &'static [f64] {
    static TABLE: OnceLock<Vec<f64>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (1..=DCG_TABLE_LEN)
            .map(|rank| 1.0 / ((1 + rank) as f64).log2())
            .collect()
    })
}

/// Position weight (exposure) of the 1-based `rank` under the DCG browsing model:
/// `1 / log2(1 + rank)` (Singh & Joachims 2018; Järvelin & Kekäläinen 2002). Rank 0 has weight 0.
pub fn dcg_weight(rank: usize) -> f64 {
    if rank == 0 {
        return 0.0;
    }
    match dcg_table().get(rank - 1) {
        Some(&weight) => weight,
        None => 1.0 / ((1 + rank) as f64).log2(),
    }
}

/// Tolerance that absorbs decimal shares that are not exact in binary (0.29 * 100 = 28.999...).
const SHARE_EPSILON: f64 = 1e-9;

/// `floor(prefix * share)`, robust to decimal shares that are not exact in binary.
pub fn floor_share(prefix: usize, share: f64) -> usize {
    let value = (prefix as f64 * share + SHARE_EPSILON).floor();
    if value <= 0.0 { 0 } else { value as usize }
}

/// `ceil(prefix * share)`, robust to decimal shares that are not exact in binary.
pub fn ceil_share(prefix: usize, share: f64) -> usize {
    let value = (prefix as f64 * share - SHARE_EPSILON).ceil();
    if value <= 0.0 { 0 } else { value as usize }
}

/// The smallest prefix length `t` with `floor_share(t, share) >= count`, or `None` if `share`
/// is zero or the prefix would not fit in `usize`.
pub fn share_deadline(count: usize, share: f64) -> Option<usize> {
    if count == 0 {
        return Some(0);
    }
    if share <= 0.0 {
        return None;
    }
    let estimate = ((count as f64 - SHARE_EPSILON) / share).ceil();
    if estimate.is_nan() || estimate >= (usize::MAX / 2) as f64 {
        return None;
    }
    let mut prefix = estimate.max(0.0) as usize;
    while prefix > 0 && floor_share(prefix - 1, share) >= count {
        prefix -= 1;
    }
    while floor_share(prefix, share) < count {
        prefix += 1;
    }
    Some(prefix)
}

/// A uniform draw from the open interval (0, 1) with 53 random bits.
pub(crate) fn open_unit(rng: &mut dyn rand::RngCore) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_pool_accepts_ties_and_rejects_disorder_and_nan() {
        let ok = [
            Candidate::new(0, 3.0, 0),
            Candidate::new(1, 3.0, 1),
            Candidate::new(2, -1.0, 0),
        ];
        assert!(validate_pool(&ok).is_ok());
        assert!(validate_pool(&[]).is_ok());
        let unsorted = [Candidate::new(0, 1.0, 0), Candidate::new(1, 2.0, 0)];
        assert!(matches!(
            validate_pool(&unsorted),
            Err(FairnessError::InvalidPool { position: 1, .. })
        ));
        let nan = [Candidate::new(0, f32::NAN, 0)];
        assert!(matches!(
            validate_pool(&nan),
            Err(FairnessError::InvalidPool { position: 0, .. })
        ));
        let inf = [Candidate::new(0, f32::INFINITY, 0)];
        assert!(validate_pool(&inf).is_err());
    }

    #[test]
    fn dcg_weight_matches_formula_inside_and_outside_the_table() {
        assert_eq!(dcg_weight(0), 0.0);
        assert!((dcg_weight(1) - 1.0).abs() < 1e-15);
        assert!((dcg_weight(3) - 0.5).abs() < 1e-15);
        for rank in [2usize, 17, 4096, 4097, 100_000] {
            let expected = 1.0 / ((1 + rank) as f64).log2();
            assert!((dcg_weight(rank) - expected).abs() < 1e-15, "rank {rank}");
        }
    }

    #[test]
    fn share_floors_are_robust_to_decimal_shares() {
        // 100 * 0.29 is 28.999999999999996 in binary floating point.
        assert_eq!(floor_share(100, 0.29), 29);
        assert_eq!(ceil_share(100, 0.29), 29);
        assert_eq!(floor_share(7, 0.5), 3);
        assert_eq!(ceil_share(7, 0.5), 4);
        assert_eq!(floor_share(5, 0.0), 0);
    }

    #[test]
    fn share_deadline_is_the_first_prefix_reaching_the_count() {
        for share in [0.1, 0.25, 0.29, 1.0 / 3.0, 0.5, 0.7, 1.0] {
            for count in 0..40 {
                let deadline = share_deadline(count, share).expect("positive share");
                assert!(floor_share(deadline, share) >= count);
                if deadline > 0 {
                    assert!(floor_share(deadline - 1, share) < count);
                }
            }
        }
        assert_eq!(share_deadline(1, 0.0), None);
    }
}
