//! FA*IR mtables (Zehlike et al., CIKM 2017): the minimum number of protected candidates per
//! prefix, the exact probability that a fair random ranking fails them, the adjusted
//! significance level, and a shared cache.
//!
//! Null model: each of the `k` positions holds a protected candidate independently with
//! probability `p`, so the number of protected candidates in the top `i` is `X_i ~ Bin(i, p)`.
//! The ranked group fairness test at level `alpha` accepts prefix `i` when
//! `BinomCDF(t_i; i, p) > alpha`, which defines
//!
//! `m(i) = min { m : BinomCDF(m; i, p) > alpha }` (the inverse binomial CDF).
//!
//! The comparison is strict, as in the paper's test. The reference code's
//! `scipy.stats.binom.ppf(alpha, i, p)` takes the smallest `m` with `BinomCDF >= alpha`, which
//! differs when a CDF value equals `alpha` exactly: for `k = 4, p = 0.5, alpha = 0.0625`
//! (`BinomCDF(0; 4, 0.5) = 1/16`) this mtable is `[0, 0, 0, 1]` and the reference's ends in 0.
//!
//! Because the test is repeated at every prefix, a fair ranking fails at least one of them
//! with probability `P(exists i <= k : X_i < m(i))`, larger than `alpha`. [`failure_probability`]
//! computes that probability exactly by dynamic programming over the number of protected
//! items in the prefix of a Bernoulli(p) sequence, over all `k` positions (the reference code
//! `fair-search/fairsearch-fair-python` drops the constraint at position `k` and may return an
//! adjusted alpha whose failure probability exceeds `alpha`). [`MTable::adjusted`] returns the
//! largest `alpha' <= alpha` whose mtable fails with probability at most `alpha`, exactly: the
//! mtable only changes at the finitely many breakpoints `alpha' = BinomCDF(j; i, p)`, the
//! failure probability is non-decreasing in `alpha'`, and `alpha' = alpha / (2k)` is always
//! acceptable (union bound), so a binary search over the sorted breakpoints in
//! `(alpha / 2k, alpha]` finds the answer.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::FairnessError;

/// Largest `k` for which mtables are computed (cost grows like `k^1.5` to `k^2`).
pub const MAX_MTABLE_K: usize = 10_000;

/// Smallest accepted significance level (keeps the tail arithmetic far from underflow).
pub const MIN_ALPHA: f64 = 1e-12;

/// Largest accepted significance level.
pub const MAX_ALPHA: f64 = 0.5;

/// Probabilities below this are dropped from the banded recurrences (far below any level
/// `alpha / 2k >= 5e-17` that matters, and above the subnormal range).
const TINY: f64 = 1e-300;

/// The minimum number of protected candidates for every prefix of a ranking of length `k`.
#[derive(Debug, Clone, PartialEq)]
pub struct MTable {
    /// Ranking length the table covers.
    pub k: usize,
    /// Target minimum proportion of protected candidates.
    pub p: f64,
    /// Requested significance level.
    pub alpha: f64,
    /// Significance level the table was built with: `alpha` when not adjusted, otherwise the
    /// largest `alpha' <= alpha` whose table fails with probability at most `alpha`.
    pub adjusted_alpha: f64,
    /// Whether `adjusted_alpha` was searched for (FA*IR's multiple-test correction).
    pub adjusted: bool,
    /// `min_protected[i - 1] = m(i)` for prefixes `i = 1..=k`.
    pub min_protected: Vec<u32>,
    /// Exact probability that a ranking drawn from the null model fails some prefix.
    pub failure_probability: f64,
}

impl MTable {
    /// The table at significance level `alpha` without multiple-test correction.
    pub fn unadjusted(k: usize, p: f64, alpha: f64) -> Result<Self, FairnessError> {
        check_parameters(k, p, alpha)?;
        let rows = Breakpoints::compute(k, p, alpha, alpha);
        let min_protected = rows.base.clone();
        let failure_probability = failure_probability_unchecked(p, &min_protected);
        Ok(Self {
            k,
            p,
            alpha,
            adjusted_alpha: alpha,
            adjusted: false,
            min_protected,
            failure_probability,
        })
    }

    /// The table at the adjusted significance level (see the module documentation).
    pub fn adjusted(k: usize, p: f64, alpha: f64) -> Result<Self, FairnessError> {
        check_parameters(k, p, alpha)?;
        if k == 0 {
            return Ok(Self {
                k,
                p,
                alpha,
                adjusted_alpha: alpha,
                adjusted: true,
                min_protected: Vec::new(),
                failure_probability: 0.0,
            });
        }
        let floor = alpha / (2 * k) as f64;
        let rows = Breakpoints::compute(k, p, floor, alpha);
        let mut table = Vec::with_capacity(k);
        rows.table_at(alpha, &mut table);
        let failure = failure_probability_unchecked(p, &table);
        if failure <= alpha {
            return Ok(Self {
                k,
                p,
                alpha,
                adjusted_alpha: alpha,
                adjusted: true,
                min_protected: table,
                failure_probability: failure,
            });
        }
        let mut breakpoints = rows.values.clone();
        breakpoints.sort_by(f64::total_cmp);
        breakpoints.dedup();
        // Index 0 stands for `floor` (acceptable by the union bound: the failure probability is
        // at most sum_i P(X_i < m(i)) <= k * floor = alpha / 2); index t >= 1 for breakpoints[t-1].
        // The table at the last breakpoint equals the table at alpha, which fails.
        let level = |index: usize| {
            if index == 0 {
                floor
            } else {
                breakpoints[index - 1]
            }
        };
        let mut good = 0usize;
        let mut bad = breakpoints.len();
        let mut good_failure = None;
        while bad - good > 1 {
            let middle = good + (bad - good) / 2;
            rows.table_at(level(middle), &mut table);
            let failure = failure_probability_unchecked(p, &table);
            if failure <= alpha {
                good = middle;
                good_failure = Some(failure);
            } else {
                bad = middle;
            }
        }
        rows.table_at(level(good), &mut table);
        let failure = match good_failure {
            Some(failure) => failure,
            None => failure_probability_unchecked(p, &table),
        };
        // The largest level that still yields the accepted table: just below the first
        // breakpoint whose table fails.
        let first_bad = level(bad);
        let adjusted_alpha = f64::from_bits(first_bad.to_bits() - 1);
        Ok(Self {
            k,
            p,
            alpha,
            adjusted_alpha,
            adjusted: true,
            min_protected: table,
            failure_probability: failure,
        })
    }

    /// The adjusted or unadjusted table.
    pub fn compute(
        k: usize,
        p: f64,
        alpha: f64,
        adjust_alpha: bool,
    ) -> Result<Self, FairnessError> {
        if adjust_alpha {
            Self::adjusted(k, p, alpha)
        } else {
            Self::unadjusted(k, p, alpha)
        }
    }

    /// `m(prefix)`: protected candidates required in the top `prefix` (0 for prefix 0 or
    /// beyond the table).
    pub fn required(&self, prefix: usize) -> usize {
        if prefix == 0 {
            return 0;
        }
        self.min_protected
            .get(prefix - 1)
            .map_or(0, |&m| m as usize)
    }
}

/// The unadjusted mtable `m(1..=k)` at level `alpha` (`result[i - 1] = m(i)`).
pub fn mtable(k: usize, p: f64, alpha: f64) -> Result<Vec<u32>, FairnessError> {
    Ok(MTable::unadjusted(k, p, alpha)?.min_protected)
}

/// The adjusted significance level for `(k, p, alpha)` (see the module documentation).
pub fn adjusted_alpha(k: usize, p: f64, alpha: f64) -> Result<f64, FairnessError> {
    Ok(MTable::adjusted(k, p, alpha)?.adjusted_alpha)
}

/// Exact probability that a ranking whose positions are protected independently with
/// probability `p` has fewer than `min_protected[i - 1]` protected candidates in some prefix
/// `i = 1..=min_protected.len()`.
pub fn failure_probability(p: f64, min_protected: &[u32]) -> Result<f64, FairnessError> {
    if !(p > 0.0 && p < 1.0) {
        return Err(FairnessError::input(
            "failure_probability",
            format!("p = {p} must lie in (0, 1)"),
        ));
    }
    if min_protected.len() > MAX_MTABLE_K {
        return Err(FairnessError::input(
            "failure_probability",
            format!(
                "table length {} exceeds {MAX_MTABLE_K}",
                min_protected.len()
            ),
        ));
    }
    Ok(failure_probability_unchecked(p, min_protected))
}

fn check_parameters(k: usize, p: f64, alpha: f64) -> Result<(), FairnessError> {
    let invalid = |parameter: &str, reason: String| FairnessError::InvalidParameter {
        constraint: "fa*ir".to_string(),
        parameter: parameter.to_string(),
        reason,
    };
    if !(p > 0.0 && p < 1.0) {
        return Err(invalid(
            "p",
            format!("{p} must lie strictly between 0 and 1"),
        ));
    }
    if !(MIN_ALPHA..=MAX_ALPHA).contains(&alpha) {
        return Err(invalid(
            "alpha",
            format!("{alpha} must lie in [{MIN_ALPHA}, {MAX_ALPHA}]"),
        ));
    }
    if k > MAX_MTABLE_K {
        return Err(FairnessError::KTooLarge {
            constraint: "fa*ir".to_string(),
            k,
            max: MAX_MTABLE_K,
        });
    }
    Ok(())
}

/// For each prefix `i`, the number of `j` with `BinomCDF(j; i, p) <= low` (`base`) and the
/// CDF values in `(low, high]` (the breakpoints of the mtable for levels in that range).
#[derive(Debug)]
struct Breakpoints {
    base: Vec<u32>,
    offsets: Vec<usize>,
    values: Vec<f64>,
}

impl Breakpoints {
    fn compute(k: usize, p: f64, low: f64, high: f64) -> Self {
        let q = 1.0 - p;
        let mut current = vec![0.0f64; k + 2];
        let mut next = vec![0.0f64; k + 2];
        current[0] = 1.0;
        // Invariant: `current` is zero outside [lo, hi]; `next` is zero outside [next_lo, next_hi].
        let (mut lo, mut hi) = (0usize, 0usize);
        let (mut next_lo, mut next_hi) = (0usize, 0usize);
        let mut base = Vec::with_capacity(k);
        let mut offsets = Vec::with_capacity(k + 1);
        let mut values = Vec::new();
        offsets.push(0);
        for _prefix in 1..=k {
            next[next_lo..=next_hi].fill(0.0);
            binomial_step(&current, &mut next, lo, hi, p, q);
            let (mut new_lo, mut new_hi) = (lo, hi + 1);
            while new_lo < new_hi && next[new_lo] < TINY {
                next[new_lo] = 0.0;
                new_lo += 1;
            }
            while new_hi > new_lo && next[new_hi] < TINY {
                next[new_hi] = 0.0;
                new_hi -= 1;
            }
            std::mem::swap(&mut current, &mut next);
            next_lo = lo;
            next_hi = hi + 1;
            lo = new_lo;
            hi = new_hi;
            // CDF values of this row; the trimmed lower tail (< 1e-300 in total per entry)
            // counts as below `low`.
            let mut count = lo as u32;
            let mut cdf = 0.0;
            for &mass in &current[lo..=hi] {
                cdf += mass;
                if cdf <= low {
                    count += 1;
                } else if cdf <= high {
                    values.push(cdf);
                } else {
                    break;
                }
            }
            base.push(count);
            offsets.push(values.len());
        }
        Self {
            base,
            offsets,
            values,
        }
    }

    /// The mtable at level `level` (`low <= level <= high`).
    fn table_at(&self, level: f64, table: &mut Vec<u32>) {
        table.clear();
        for (row, &base) in self.base.iter().enumerate() {
            let cdfs = &self.values[self.offsets[row]..self.offsets[row + 1]];
            table.push(base + cdfs.partition_point(|&cdf| cdf <= level) as u32);
        }
    }
}

/// One step of the binomial recurrence `next[j] = current[j] q + current[j - 1] p` over the
/// band `[lo, hi + 1]` (`current` is zero outside `[lo, hi]`).
fn binomial_step(current: &[f64], next: &mut [f64], lo: usize, hi: usize, p: f64, q: f64) {
    next[lo] = current[lo] * q + if lo > 0 { current[lo - 1] * p } else { 0.0 };
    let stay = &current[lo + 1..=hi + 1];
    let step = &current[lo..=hi];
    for ((out, &s), &m) in next[lo + 1..=hi + 1].iter_mut().zip(stay).zip(step) {
        *out = s * q + m * p;
    }
}

fn failure_probability_unchecked(p: f64, min_protected: &[u32]) -> f64 {
    let k = min_protected.len();
    let q = 1.0 - p;
    let mut current = vec![0.0f64; k + 2];
    let mut next = vec![0.0f64; k + 2];
    current[0] = 1.0;
    let (mut lo, mut hi) = (0usize, 0usize);
    let (mut next_lo, mut next_hi) = (0usize, 0usize);
    let mut failure = 0.0;
    for (index, &required) in min_protected.iter().enumerate() {
        let prefix = index + 1;
        next[next_lo..=next_hi].fill(0.0);
        binomial_step(&current, &mut next, lo, hi, p, q);
        let mut new_lo = lo;
        let new_hi_bound = hi + 1;
        let required = required as usize;
        if required > prefix {
            // Impossible requirement: every surviving sequence fails here.
            failure += next[lo..=new_hi_bound].iter().sum::<f64>();
            return failure.min(1.0);
        }
        while new_lo < required && new_lo <= new_hi_bound {
            failure += next[new_lo];
            next[new_lo] = 0.0;
            new_lo += 1;
        }
        if new_lo > new_hi_bound {
            return failure.min(1.0);
        }
        let mut new_hi = new_hi_bound;
        while new_hi > new_lo && next[new_hi] < TINY {
            next[new_hi] = 0.0;
            new_hi -= 1;
        }
        std::mem::swap(&mut current, &mut next);
        next_lo = lo;
        next_hi = hi + 1;
        lo = new_lo;
        hi = new_hi;
    }
    failure.min(1.0)
}

/// Cache key: `(k, p bits, alpha bits, adjusted)`.
type MTableKey = (usize, u64, u64, bool);

/// A thread-safe cache of mtables keyed by `(k, p, alpha, adjust_alpha)`, shared by every
/// FA*IR re-ranker built from one [`crate::Registry`].
#[derive(Debug)]
pub struct MTableCache {
    tables: RwLock<HashMap<MTableKey, Arc<MTable>>>,
    capacity: usize,
}

impl Default for MTableCache {
    fn default() -> Self {
        Self::new(1024)
    }
}

impl MTableCache {
    /// A cache holding at most `capacity` tables (it is emptied when full).
    pub fn new(capacity: usize) -> Self {
        Self {
            tables: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The cached table, computing and inserting it on a miss.
    pub fn get_or_compute(
        &self,
        k: usize,
        p: f64,
        alpha: f64,
        adjust_alpha: bool,
    ) -> Result<Arc<MTable>, FairnessError> {
        let key = (k, p.to_bits(), alpha.to_bits(), adjust_alpha);
        {
            let tables = self
                .tables
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(table) = tables.get(&key) {
                return Ok(Arc::clone(table));
            }
        }
        let table = Arc::new(MTable::compute(k, p, alpha, adjust_alpha)?);
        let mut tables = self
            .tables
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tables.len() >= self.capacity {
            tables.clear();
        }
        Ok(Arc::clone(tables.entry(key).or_insert(table)))
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.tables
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all 2^k protected/non-protected sequences.
    fn brute_force_failure(p: f64, table: &[u32]) -> f64 {
        let k = table.len();
        let mut failure = 0.0;
        for mask in 0u32..(1u32 << k) {
            let protected = mask.count_ones() as i32;
            let probability = p.powi(protected) * (1.0 - p).powi(k as i32 - protected);
            let mut count = 0u32;
            let fails = (0..k).any(|i| {
                count += (mask >> i) & 1;
                count < table[i]
            });
            if fails {
                failure += probability;
            }
        }
        failure
    }

    /// Direct inverse CDF from the binomial formula (small k only).
    fn direct_mtable(k: usize, p: f64, alpha: f64) -> Vec<u32> {
        (1..=k)
            .map(|i| {
                let mut cdf = 0.0;
                let mut m = 0u32;
                for j in 0..=i {
                    let mut binomial = 1.0;
                    for t in 0..j {
                        binomial *= (i - t) as f64 / (t + 1) as f64;
                    }
                    cdf += binomial * p.powi(j as i32) * (1.0 - p).powi((i - j) as i32);
                    if cdf > alpha {
                        break;
                    }
                    m += 1;
                }
                m
            })
            .collect()
    }

    #[test]
    fn unadjusted_mtables_match_published_values() {
        // Zehlike et al. 2017, Table 2 (alpha = 0.1), p = 0.5 and k = 1..=12, hand-checked:
        // BinomCDF(0; 4, .5) = 1/16 <= .1 < BinomCDF(1; 4, .5) = 5/16 gives m(4) = 1, etc.
        assert_eq!(
            mtable(12, 0.5, 0.1).expect("valid"),
            vec![0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4]
        );
        // fairsearch-fair-python test cases for the unadjusted table.
        assert_eq!(
            mtable(10, 0.2, 0.15).expect("valid"),
            vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
        );
        assert_eq!(
            mtable(20, 0.25, 0.1).expect("valid"),
            vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3]
        );
        assert_eq!(
            mtable(30, 0.3, 0.05).expect("valid"),
            vec![
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 5,
                5, 5
            ]
        );
    }

    #[test]
    fn mtable_matches_the_direct_inverse_cdf() {
        for &(k, p, alpha) in &[
            (40usize, 0.3, 0.1),
            (35, 0.7, 0.05),
            (25, 0.05, 0.2),
            (50, 0.5, 0.01),
        ] {
            assert_eq!(
                mtable(k, p, alpha).expect("valid"),
                direct_mtable(k, p, alpha),
                "k={k} p={p} alpha={alpha}"
            );
        }
    }

    #[test]
    fn failure_probability_matches_brute_force_enumeration() {
        for &(k, p, alpha) in &[
            (10usize, 0.2, 0.15),
            (12, 0.5, 0.1),
            (14, 0.3, 0.1),
            (13, 0.7, 0.2),
            (9, 0.45, 0.05),
        ] {
            let table = mtable(k, p, alpha).expect("valid");
            let exact = failure_probability(p, &table).expect("valid");
            let brute = brute_force_failure(p, &table);
            assert!(
                (exact - brute).abs() < 1e-12,
                "k={k} p={p} alpha={alpha}: {exact} vs {brute}"
            );
        }
        // The constraint at the last position counts: requiring 1 protected only at k = 3.
        let exact = failure_probability(0.5, &[0, 0, 1]).expect("valid");
        assert!((exact - 0.125).abs() < 1e-15);
        // Impossible requirements fail surely.
        assert!((failure_probability(0.5, &[2]).expect("valid") - 1.0).abs() < 1e-15);
    }

    #[test]
    fn failure_probability_of_the_reference_case_is_exact() {
        // mtable [0 x 8, 1, 1]: fails iff none of the first 9 positions is protected.
        let table = mtable(10, 0.2, 0.15).expect("valid");
        let exact = failure_probability(0.2, &table).expect("valid");
        assert!((exact - 0.8f64.powi(9)).abs() < 1e-15);
    }

    #[test]
    fn adjusted_alpha_is_maximal_and_never_exceeds_alpha() {
        for &(k, p, alpha) in &[
            (20usize, 0.25, 0.1),
            (30, 0.3, 0.05),
            (14, 0.5, 0.1),
            (100, 0.5, 0.1),
            (200, 0.2, 0.05),
        ] {
            let table = MTable::adjusted(k, p, alpha).expect("valid");
            assert!(table.adjusted_alpha <= alpha);
            assert!(
                table.failure_probability <= alpha,
                "k={k}: {}",
                table.failure_probability
            );
            let recomputed = failure_probability(p, &table.min_protected).expect("valid");
            assert!((recomputed - table.failure_probability).abs() < 1e-15);
            // The table is the unadjusted table at the adjusted level.
            assert_eq!(
                table.min_protected,
                mtable(k, p, table.adjusted_alpha).expect("valid")
            );
            if table.adjusted_alpha < alpha {
                // Any larger level gives a table that fails too often.
                let above = f64::from_bits(table.adjusted_alpha.to_bits() + 1);
                let bigger = mtable(k, p, above).expect("valid");
                assert_ne!(bigger, table.min_protected);
                assert!(failure_probability(p, &bigger).expect("valid") > alpha);
            }
        }
        // The reference implementation returns an mtable failing with probability 0.105 > 0.1
        // for (20, 0.25, 0.1); ours stays below alpha.
        let reference_like = MTable::adjusted(20, 0.25, 0.1).expect("valid");
        assert!(reference_like.failure_probability <= 0.1);
    }

    #[test]
    fn adjusted_alpha_brute_force_on_small_k() {
        // Scan a fine grid of levels and check that no acceptable level above ours exists.
        for &(k, p, alpha) in &[(12usize, 0.5, 0.1), (10, 0.2, 0.15), (13, 0.35, 0.08)] {
            let table = MTable::adjusted(k, p, alpha).expect("valid");
            for step in 1..=400 {
                let level = alpha * step as f64 / 400.0;
                let candidate = mtable(k, p, level).expect("valid");
                let failure = brute_force_failure(p, &candidate);
                if failure <= alpha {
                    assert!(
                        level <= table.adjusted_alpha || candidate == table.min_protected,
                        "level {level}"
                    );
                }
            }
        }
    }

    #[test]
    fn small_k_needs_no_adjustment() {
        let table = MTable::adjusted(3, 0.5, 0.1).expect("valid");
        assert_eq!(table.min_protected, vec![0, 0, 0]);
        assert_eq!(table.adjusted_alpha, 0.1);
        assert_eq!(table.failure_probability, 0.0);
        assert_eq!(
            MTable::adjusted(0, 0.5, 0.1).expect("valid").min_protected,
            Vec::<u32>::new()
        );
    }

    #[test]
    fn parameters_are_validated() {
        assert!(matches!(
            mtable(10, 0.0, 0.1),
            Err(FairnessError::InvalidParameter { .. })
        ));
        assert!(matches!(
            mtable(10, 0.5, 0.9),
            Err(FairnessError::InvalidParameter { .. })
        ));
        assert!(matches!(
            mtable(MAX_MTABLE_K + 1, 0.5, 0.1),
            Err(FairnessError::KTooLarge { .. })
        ));
        assert!(failure_probability(1.5, &[0]).is_err());
    }

    #[test]
    fn cache_returns_the_same_table() {
        let cache = MTableCache::new(2);
        let first = cache.get_or_compute(20, 0.3, 0.1, true).expect("valid");
        let second = cache.get_or_compute(20, 0.3, 0.1, true).expect("valid");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(cache.len(), 1);
        cache.get_or_compute(20, 0.3, 0.1, false).expect("valid");
        cache.get_or_compute(21, 0.3, 0.1, false).expect("valid");
        assert!(cache.len() <= 2);
    }
}
