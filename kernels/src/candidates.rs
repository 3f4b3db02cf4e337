//! Candidate-list scoring: gather rows by index, score them eight at a time, optionally top-k.
//!
//! Rows are gathered in candidate order and scored by the same kernel as the whole-table scan,
//! so a row's score here equals its scan score bit for bit.

use crate::error::KernelError;
use crate::matrix::RowMatrix;
use crate::scan::with_thread_scratch;
use crate::simd::{ROW_BLOCK, prefetch_l2, score_row, score_rows8};
use crate::topk::{ScoredItem, TopKScratch, keep_best, may_enter, sort_ranked};
use crate::validate::{check_candidates, check_k, check_query};
use wide::f32x8;

/// How many 8-row blocks ahead candidate rows are prefetched (measured on 1000 random rows of a
/// 512 MB table: 4 to 12 blocks are equal, 1 block is 1.4x slower).
const PREFETCH_BLOCKS: usize = 4;

/// Bounds of the number of kept survivors at which they are cut back to the best `k` (at
/// least `2 k`; about a sixteenth of the list in between). A small list is cut early so that
/// the threshold rises after a few dozen rows and later rows rarely survive: with 1000
/// candidates and k = 10, one selection over all 1000 survivors at the end cost as many
/// instructions as scoring them (callgrind), where cuts at 64 cost a few percent. A long list
/// is cut less often, since each cut is a linear-time selection over the kept items.
const MIN_KEPT_CAPACITY: usize = 64;
const MAX_KEPT_CAPACITY: usize = 4096;

/// Requests into L2 the rows of candidate group `group` (groups of eight; the trailing partial
/// group is number `blocks.len()`; larger numbers are ignored), `row(c)` being candidate `c`'s
/// data (its f32 row, or its int8 codes). Random rows come from DRAM, and L2 tracks more
/// outstanding misses than L1, so this keeps many rows in flight at once.
#[inline]
pub(crate) fn prefetch_group<'m, T: 'm>(
    blocks: &[[u32; ROW_BLOCK]],
    rest: &[u32],
    group: usize,
    row: impl Fn(usize) -> &'m [T],
) {
    let rows: &[u32] = match blocks.get(group) {
        Some(block) => block,
        None if group == blocks.len() => rest,
        None => return,
    };
    for &c in rows {
        prefetch_l2(row(c as usize));
    }
}

/// Scores each candidate row: `out[i]` is the score of row `candidates[i]`.
///
/// `out` is cleared and refilled. Fails on a query of the wrong length, a non-finite query,
/// or a candidate index `>= m.rows()` (reporting its position). Uses a per-thread scratch
/// for the padded query, so it allocates nothing once warmed up.
pub fn score_candidates(
    m: RowMatrix<'_>,
    query: &[f32],
    candidates: &[u32],
    out: &mut Vec<f32>,
) -> Result<(), KernelError> {
    check_query(m.dim(), query, 0)?;
    check_candidates(m.rows(), candidates)?;
    out.clear();
    out.reserve(candidates.len());
    with_thread_scratch(|scratch| {
        scratch.query.prepare(query);
        let query = &scratch.query;
        let (blocks, rest) = candidates.as_chunks::<ROW_BLOCK>();
        for group in 0..PREFETCH_BLOCKS {
            prefetch_group(blocks, rest, group, |c| m.row(c));
        }
        for (b, block) in blocks.iter().enumerate() {
            prefetch_group(blocks, rest, b + PREFETCH_BLOCKS, |c| m.row(c));
            let rows = block.map(|c| m.row_extended(c as usize));
            out.extend_from_slice(&score_rows8(rows, query).to_array());
        }
        out.extend(
            rest.iter()
                .map(|&c| score_row(m.row_extended(c as usize), query)),
        );
    });
    Ok(())
}

/// The best `k` candidate rows for `query`, best first, into `out`.
///
/// `ScoredItem::index` is the row index (not the position in `candidates`). `out` receives
/// `min(k, candidates.len())` items ordered by score descending, ties by row index
/// ascending. A row listed twice is scored twice and may appear twice (the engine rejects
/// duplicate candidates at the API boundary). Errors as [`score_candidates`], plus `k == 0`.
pub fn candidates_topk(
    m: RowMatrix<'_>,
    query: &[f32],
    candidates: &[u32],
    k: usize,
    scratch: &mut TopKScratch,
    out: &mut Vec<ScoredItem>,
) -> Result<(), KernelError> {
    check_k(k)?;
    check_query(m.dim(), query, 0)?;
    check_candidates(m.rows(), candidates)?;
    scratch.query.prepare(query);
    let query = &scratch.query;
    // Survivors are appended and cut back to the best `k` in bulk (see [`keep_best`]): a few
    // nanoseconds per row where heap insertions cost tens, and the loop has no
    // data-dependent branches beyond the threshold test, so the row gathers keep flowing.
    let kept = &mut scratch.kept;
    kept.clear();
    let k = k.min(candidates.len());
    let capacity =
        2 * k.max((candidates.len() / 32).clamp(MIN_KEPT_CAPACITY / 2, MAX_KEPT_CAPACITY / 2));
    let mut threshold = f32::NEG_INFINITY;
    let offer = |kept: &mut Vec<ScoredItem>, threshold: &mut f32, item: ScoredItem| {
        kept.push(item);
        if kept.len() >= capacity {
            keep_best(kept, k);
            // The k-th best score so far (`keep_best` leaves it last).
            *threshold = kept.last().map_or(f32::NEG_INFINITY, |worst| worst.score);
        }
    };
    let (blocks, rest) = candidates.as_chunks::<ROW_BLOCK>();
    for group in 0..PREFETCH_BLOCKS {
        prefetch_group(blocks, rest, group, |c| m.row(c));
    }
    for (b, block) in blocks.iter().enumerate() {
        prefetch_group(blocks, rest, b + PREFETCH_BLOCKS, |c| m.row(c));
        let scores = score_rows8(block.map(|c| m.row_extended(c as usize)), query);
        let mut survivors = !scores.simd_lt(f32x8::splat(threshold)).to_bitmask() & 0xFF;
        if survivors != 0 {
            let scores = scores.to_array();
            while survivors != 0 {
                let lane = survivors.trailing_zeros() as usize;
                offer(
                    kept,
                    &mut threshold,
                    ScoredItem::new(block[lane], scores[lane]),
                );
                survivors &= survivors - 1;
            }
        }
    }
    for &c in rest {
        let score = score_row(m.row_extended(c as usize), query);
        if may_enter(score, threshold) {
            offer(kept, &mut threshold, ScoredItem::new(c, score));
        }
    }
    keep_best(kept, k);
    out.clear();
    out.extend_from_slice(kept);
    sort_ranked(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::scan::scan_topk;
    use crate::testutil::{check_topk, integer_rows, random_rows, random_vec, spec_scores};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::seq::SliceRandom;

    /// `count` distinct row indices below `rows`, shuffled.
    fn distinct_candidates(seed: u64, rows: usize, count: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..rows as u32).collect();
        all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        all.truncate(count);
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn candidates_match_scalar(
            rows in 1usize..300,
            dim in 1usize..40,
            pad in 0usize..9,
            fraction in 0.0f64..1.0,
            k in 1usize..200,
            seed in any::<u64>(),
        ) {
            let stride = dim + pad;
            let data = random_rows(seed, rows, dim, stride);
            let m = RowMatrix::new(&data, rows, dim, stride).unwrap();
            let query = random_vec(!seed, dim);
            let candidates = distinct_candidates(seed, rows, (rows as f64 * fraction) as usize);

            let mut scores = Vec::new();
            score_candidates(m, &query, &candidates, &mut scores).unwrap();
            let spec = spec_scores(m, &query, candidates.iter().copied());
            prop_assert_eq!(scores.len(), candidates.len());
            for (score, s) in scores.iter().zip(&spec) {
                prop_assert!((score - s.score).abs() <= s.tolerance);
            }

            let mut top = Vec::new();
            candidates_topk(m, &query, &candidates, k, &mut TopKScratch::new(), &mut top).unwrap();
            check_topk(&spec, &top, k).map_err(TestCaseError::fail)?;
            // Same kernel as the scan: identical scores for identical rows.
            for item in &top {
                let position = candidates.iter().position(|&c| c == item.index).unwrap();
                prop_assert_eq!(item.score.to_bits(), scores[position].to_bits());
            }
        }

        #[test]
        fn integer_candidates_match_scalar_exactly(
            rows in 1usize..150,
            dim in 1usize..20,
            count in 0usize..200,
            k in 1usize..60,
            seed in any::<u64>(),
        ) {
            let data = integer_rows(seed, rows, dim, dim);
            let m = RowMatrix::dense(&data, dim).unwrap();
            let query = integer_rows(!seed, 1, dim, dim);
            // With replacement: duplicates are scored as listed.
            let candidates: Vec<u32> = (0..count).map(|i| ((seed as usize).wrapping_add(i * 31) % rows) as u32).collect();
            let spec = scalar::candidates_topk(m, &query, &candidates, k).unwrap();
            let mut top = Vec::new();
            candidates_topk(m, &query, &candidates, k, &mut TopKScratch::new(), &mut top).unwrap();
            prop_assert_eq!(top, spec);
            let mut scores = Vec::new();
            score_candidates(m, &query, &candidates, &mut scores).unwrap();
            prop_assert_eq!(scores, scalar::score_candidates(m, &query, &candidates).unwrap());
        }
    }

    #[test]
    fn long_lists_are_cut_back_in_bulk_exactly() {
        // Longer than MAX_KEPT_CAPACITY, so survivors are cut back to the best k (and the
        // threshold raised) several times during the scan; integer data makes scores exact
        // and ties frequent, and listing rows many times makes duplicates compete.
        let (rows, dim) = (700, 5);
        let data = integer_rows(11, rows, dim, dim);
        let m = RowMatrix::dense(&data, dim).unwrap();
        let query = integer_rows(12, 1, dim, dim);
        let count = 3 * MAX_KEPT_CAPACITY + 5;
        let candidates: Vec<u32> = (0..count).map(|i| ((i * 7919) % rows) as u32).collect();
        let mut scratch = TopKScratch::new();
        let mut top = Vec::new();
        for k in [1, 9, 100, MIN_KEPT_CAPACITY, MAX_KEPT_CAPACITY, count + 3] {
            candidates_topk(m, &query, &candidates, k, &mut scratch, &mut top).unwrap();
            let spec = scalar::candidates_topk(m, &query, &candidates, k).unwrap();
            assert_eq!(top, spec, "k = {k}");
        }
    }

    #[test]
    fn candidate_scores_equal_scan_scores() {
        let (rows, dim) = (77, 29);
        let data = random_rows(3, rows, dim, 32);
        let m = RowMatrix::new(&data, rows, dim, 32).unwrap();
        let query = random_vec(4, dim);
        let mut scan = Vec::new();
        scan_topk(m, &query, rows, &mut TopKScratch::new(), &mut scan).unwrap();
        let all: Vec<u32> = (0..rows as u32).rev().collect();
        let mut top = Vec::new();
        candidates_topk(m, &query, &all, rows, &mut TopKScratch::new(), &mut top).unwrap();
        assert_eq!(top, scan);
    }

    #[test]
    fn exact_ties_break_by_row_index() {
        let dim = 11;
        let row = random_vec(5, dim);
        let data: Vec<f32> = (0..40).flat_map(|_| row.iter().copied()).collect();
        let m = RowMatrix::dense(&data, dim).unwrap();
        let candidates: Vec<u32> = vec![39, 7, 21, 3, 30, 12, 0, 25, 18, 9];
        let mut top = Vec::new();
        candidates_topk(
            m,
            &random_vec(6, dim),
            &candidates,
            4,
            &mut TopKScratch::new(),
            &mut top,
        )
        .unwrap();
        let indices: Vec<u32> = top.iter().map(|item| item.index).collect();
        assert_eq!(indices, vec![0, 3, 7, 9]);
    }

    #[test]
    fn rejects_out_of_range_and_zero_k() {
        let data = random_rows(1, 10, 4, 4);
        let m = RowMatrix::dense(&data, 4).unwrap();
        let mut scores = Vec::new();
        assert_eq!(
            score_candidates(m, &[0.0; 4], &[1, 2, 10, 3], &mut scores),
            Err(KernelError::CandidateOutOfRange {
                position: 2,
                index: 10,
                rows: 10
            })
        );
        let mut top = Vec::new();
        let mut scratch = TopKScratch::new();
        assert_eq!(
            candidates_topk(m, &[0.0; 4], &[1], 0, &mut scratch, &mut top),
            Err(KernelError::ZeroK)
        );
        assert_eq!(
            candidates_topk(m, &[0.0; 4], &[u32::MAX], 1, &mut scratch, &mut top),
            Err(KernelError::CandidateOutOfRange {
                position: 0,
                index: u32::MAX,
                rows: 10
            })
        );
        candidates_topk(m, &[0.0; 4], &[], 3, &mut scratch, &mut top).unwrap();
        assert!(top.is_empty());
    }
}
