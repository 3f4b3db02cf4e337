//! Ranked items, the one deterministic ranking order, and the bounded heap behind every top-k.
//!
//! The order is: score descending (IEEE total order, with -0.0 equal to +0.0), then row index
//! ascending. It is a total order, so every path (scalar, SIMD, parallel, batched) returns the same list for the
//! same scores, whatever order it visits rows in.

use std::cmp::Ordering;

use crate::quantized::QuantizedScratch;
use crate::simd::PreparedQuery;

/// One ranked row: its index in the matrix and its score (a dot product with the query).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoredItem {
    /// Row index in the scored matrix.
    pub index: u32,
    /// Dot product of the row with the query.
    pub score: f32,
}

impl ScoredItem {
    /// A scored row.
    #[inline]
    pub fn new(index: u32, score: f32) -> Self {
        Self { index, score }
    }

    /// The ranking order: `Less` when `self` ranks before `other` (higher score, or equal
    /// score and lower index).
    ///
    /// Scores compare under [`f32::total_cmp`] after mapping `-0.0` to `+0.0` (so zero scores
    /// tie whatever the summation order made of their sign); NaN scores, which finite inputs
    /// cannot produce short of overflow, rank first if positive and last if negative.
    #[inline]
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        // `x + 0.0` turns -0.0 into +0.0 and leaves every other value unchanged.
        let (mine, theirs) = (self.score + 0.0, other.score + 0.0);
        theirs
            .total_cmp(&mine)
            .then_with(|| self.index.cmp(&other.index))
    }

    /// True when `self` ranks strictly before `other`.
    #[inline]
    pub fn ranks_before(&self, other: &Self) -> bool {
        self.rank_cmp(other) == Ordering::Less
    }
}

/// A score as an integer that orders the other way round: `descending_key(a) <
/// descending_key(b)` exactly when `a` ranks before `b` by score alone (the score part of
/// [`ScoredItem::rank_cmp`]: [`f32::total_cmp`] after mapping `-0.0` to `+0.0`).
#[inline(always)]
pub(crate) fn descending_key(score: f32) -> u32 {
    // `x + 0.0` turns -0.0 into +0.0 and leaves every other value unchanged.
    let bits = (score + 0.0).to_bits() as i32;
    // `total_cmp`'s own transform: the result orders like the scores, as `i32`.
    let ordered = bits ^ (((bits >> 31) as u32) >> 1) as i32;
    // As `u32`, `ordered ^ i32::MIN` orders like `ordered`; its complement reverses that.
    (ordered as u32) ^ 0x7FFF_FFFF
}

/// The score whose [`descending_key`] is `key` (`+0.0` for both zeros; a NaN may come back
/// with other payload bits).
#[inline(always)]
pub(crate) fn score_of_descending_key(key: u32) -> f32 {
    let ordered = (key ^ 0x7FFF_FFFF) as i32;
    // The transform of `descending_key` is its own inverse.
    f32::from_bits((ordered ^ (((ordered >> 31) as u32) >> 1) as i32) as u32)
}

/// The ranking order as one integer: `rank_key(a) < rank_key(b)` exactly when `a` ranks
/// before `b` ([`ScoredItem::rank_cmp`]), and the keys are equal exactly when `rank_cmp` says
/// `Equal`: the score's [`descending_key`] above the row index. Sorting plain integers is
/// several times cheaper than sorting with `rank_cmp` (no float compare and tie branch, and
/// `sort_unstable`'s sorting networks apply).
#[inline(always)]
pub(crate) fn rank_key(item: &ScoredItem) -> u64 {
    (u64::from(descending_key(item.score)) << 32) | u64::from(item.index)
}

/// Sorts items best first under the ranking order.
pub fn sort_ranked(items: &mut [ScoredItem]) {
    items.sort_unstable_by(ScoredItem::rank_cmp);
}

/// Clears `out` and writes the best `k` of `items` into it, best first: what [`keep_best`]
/// then [`sort_ranked`] give, but sorting the [`rank_key`]s in `keys` (scratch) and decoding
/// the items back. When a key would not decode to its item bit for bit (a `-0.0` or NaN
/// score, which finite candidate scores never are but for `-0.0`), it takes that general
/// path instead.
pub(crate) fn write_best_sorted(
    items: &[ScoredItem],
    k: usize,
    keys: &mut Vec<u64>,
    out: &mut Vec<ScoredItem>,
) {
    out.clear();
    keys.clear();
    let mut round_trips = true;
    keys.extend(items.iter().map(|item| {
        let key = rank_key(item);
        round_trips &=
            score_of_descending_key((key >> 32) as u32).to_bits() == item.score.to_bits();
        key
    }));
    if !round_trips {
        out.extend_from_slice(items);
        keep_best(out, k);
        sort_ranked(out);
        return;
    }
    // A selection first only when it removes many keys from the sort.
    if keys.len() > 2 * k {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    keys.sort_unstable();
    keys.truncate(k);
    out.extend(
        keys.iter()
            .map(|&key| ScoredItem::new(key as u32, score_of_descending_key((key >> 32) as u32))),
    );
}

/// Cuts `items` back to its best `k` under the ranking order (in no particular order).
///
/// Linear time on average (`select_nth_unstable_by`); a no-op when `items.len() <= k`. When
/// it cuts, the last remaining item is the k-th best (the worst kept).
pub(crate) fn keep_best(items: &mut Vec<ScoredItem>, k: usize) {
    if items.len() <= k {
        return;
    }
    if let Some(last) = k.checked_sub(1) {
        items.select_nth_unstable_by(last, ScoredItem::rank_cmp);
    }
    items.truncate(k);
}

/// The score a candidate must reach (`!(score < threshold)`) to possibly enter a heap of `k`.
///
/// While the heap has fewer than `k` items every score qualifies (`-inf`, and NaN compares
/// false). Once full it is the worst kept score; the prefilter is a superset of the exact test,
/// which [`heap_offer`] applies.
#[inline]
pub(crate) fn heap_threshold(items: &[ScoredItem], k: usize) -> f32 {
    match items.first() {
        Some(worst) if items.len() >= k => worst.score,
        _ => f32::NEG_INFINITY,
    }
}

/// The scalar prefilter: true unless `score` is certainly below `threshold` (a NaN passes, and
/// the exact comparison in [`heap_offer`] decides).
#[inline(always)]
pub(crate) fn may_enter(score: f32, threshold: f32) -> bool {
    score.partial_cmp(&threshold) != Some(Ordering::Less)
}

/// Offers `item` to a bounded heap of at most `k` items whose root is the worst kept item.
/// Returns true if the item was kept.
#[inline]
pub(crate) fn heap_offer(items: &mut Vec<ScoredItem>, k: usize, item: ScoredItem) -> bool {
    if items.len() < k {
        items.push(item);
        let last = items.len() - 1;
        sift_up(items, last);
        return true;
    }
    match items.first_mut() {
        Some(worst) if item.ranks_before(worst) => {
            *worst = item;
            sift_down(items, 0);
            true
        }
        _ => false,
    }
}

/// Restores the heap property upwards from `pos` (worst item at the root).
fn sift_up(items: &mut [ScoredItem], mut pos: usize) {
    while pos > 0 {
        let parent = (pos - 1) / 2;
        if items[parent].ranks_before(&items[pos]) {
            items.swap(parent, pos);
            pos = parent;
        } else {
            break;
        }
    }
}

/// Restores the heap property downwards from `pos` (worst item at the root).
fn sift_down(items: &mut [ScoredItem], mut pos: usize) {
    let len = items.len();
    loop {
        let left = 2 * pos + 1;
        if left >= len {
            break;
        }
        let right = left + 1;
        let worse_child = if right < len && items[left].ranks_before(&items[right]) {
            right
        } else {
            left
        };
        if items[pos].ranks_before(&items[worse_child]) {
            items.swap(pos, worse_child);
            pos = worse_child;
        } else {
            break;
        }
    }
}

/// A bounded heap keeping the best `k` items seen.
#[derive(Debug, Clone, Default)]
pub(crate) struct TopKHeap {
    items: Vec<ScoredItem>,
    k: usize,
}

impl TopKHeap {
    /// Empties the heap and sets its bound; reserves `k` slots (no-op once warmed up).
    pub(crate) fn reset(&mut self, k: usize) {
        self.items.clear();
        self.items.reserve(k);
        self.k = k;
    }

    /// See [`heap_threshold`].
    #[inline]
    pub(crate) fn threshold(&self) -> f32 {
        heap_threshold(&self.items, self.k)
    }

    /// See [`heap_offer`].
    #[inline]
    pub(crate) fn offer(&mut self, item: ScoredItem) -> bool {
        heap_offer(&mut self.items, self.k, item)
    }

    /// The kept items in heap order.
    pub(crate) fn items(&self) -> &[ScoredItem] {
        &self.items
    }

    /// Clears `out` and fills it with the kept items, best first.
    pub(crate) fn write_sorted(&self, out: &mut Vec<ScoredItem>) {
        out.clear();
        out.extend_from_slice(&self.items);
        sort_ranked(out);
    }
}

/// Reusable scratch for the single-threaded top-k kernels ([`crate::scan_topk`],
/// [`crate::candidates_topk`]).
///
/// Holds the bounded heap, the survivor list and the query split into SIMD lanes. Buffers grow
/// to the largest `k`, candidate list and dimension seen and are then reused, so a warmed-up
/// scratch makes the kernels allocation-free apart from the output vector (which is also
/// reused if the caller keeps it).
#[derive(Debug, Clone, Default)]
pub struct TopKScratch {
    pub(crate) heap: TopKHeap,
    pub(crate) query: PreparedQuery,
    /// Survivors of [`crate::candidates_topk`], cut back to the best `k` in bulk (and the
    /// rescored candidates of [`crate::quantized_candidates_topk`]).
    pub(crate) kept: Vec<ScoredItem>,
    /// The quantized query and bounds of [`crate::quantized_candidates_topk`].
    pub(crate) quantized: QuantizedScratch,
}

impl TopKScratch {
    /// An empty scratch; it grows on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scratch pre-sized for top-`k` over rows of dimension `dim` (each capped at 2^20 up
    /// front, so an absurd request cannot abort; larger buffers grow on first use).
    pub fn with_capacity(k: usize, dim: usize) -> Self {
        const UP_FRONT_CAP: usize = 1 << 20;
        let mut scratch = Self::default();
        scratch.heap.reset(k.min(UP_FRONT_CAP));
        scratch.query.reserve(dim.min(UP_FRONT_CAP));
        scratch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn order_is_score_desc_then_index_asc() {
        let mut items = vec![
            ScoredItem::new(3, 1.0),
            ScoredItem::new(1, 2.0),
            ScoredItem::new(0, 1.0),
            ScoredItem::new(2, 2.0),
            ScoredItem::new(4, -1.0),
        ];
        sort_ranked(&mut items);
        let order: Vec<u32> = items.iter().map(|i| i.index).collect();
        assert_eq!(order, vec![1, 2, 0, 3, 4]);
    }

    #[test]
    fn signed_zeros_tie() {
        let mut items = vec![ScoredItem::new(2, 0.0), ScoredItem::new(1, -0.0)];
        sort_ranked(&mut items);
        assert_eq!(items[0].index, 1);
        assert!(ScoredItem::new(0, -0.0).ranks_before(&ScoredItem::new(1, 0.0)));
        assert!(ScoredItem::new(0, 1.0).ranks_before(&ScoredItem::new(0, -0.0)));
    }

    #[test]
    fn threshold_is_open_until_full() {
        let mut heap = TopKHeap::default();
        heap.reset(2);
        assert_eq!(heap.threshold(), f32::NEG_INFINITY);
        heap.offer(ScoredItem::new(0, 5.0));
        assert_eq!(heap.threshold(), f32::NEG_INFINITY);
        heap.offer(ScoredItem::new(1, 3.0));
        assert_eq!(heap.threshold(), 3.0);
        assert!(
            !heap.offer(ScoredItem::new(2, 3.0)),
            "equal score, higher index loses"
        );
        assert!(
            heap.offer(ScoredItem::new(0, 3.0)),
            "equal score, lower index wins"
        );
        assert_eq!(heap.items().len(), 2);
    }

    /// Scores that stress the ranking order: any bits (NaNs of either sign, infinities,
    /// subnormals, both zeros) or a few small values (many ties).
    fn any_score() -> impl Strategy<Value = f32> {
        prop_oneof![
            any::<u32>().prop_map(f32::from_bits),
            prop::sample::select(vec![
                0.0,
                -0.0,
                1.0,
                -1.0,
                f32::INFINITY,
                f32::NAN,
                -f32::NAN
            ]),
        ]
    }

    #[test]
    fn rank_key_orders_the_edge_cases_like_rank_cmp() {
        let scores = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            f32::from_bits(1),
            -f32::from_bits(1),
            0.0,
            -0.0,
            1.0,
            -1.0,
        ];
        for (a, &x) in scores.iter().enumerate() {
            for (b, &y) in scores.iter().enumerate() {
                for (i, j) in [(0, 0), (0, 1), (1, 0), (u32::MAX, 0)] {
                    let (first, second) = (ScoredItem::new(i, x), ScoredItem::new(j, y));
                    assert_eq!(
                        rank_key(&first).cmp(&rank_key(&second)),
                        first.rank_cmp(&second),
                        "scores {a} and {b}, indexes {i} and {j}"
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn rank_key_orders_like_rank_cmp(
            first in any_score(),
            second in any_score(),
            indexes in (0u32..3, 0u32..3),
        ) {
            let (a, b) = (ScoredItem::new(indexes.0, first), ScoredItem::new(indexes.1, second));
            prop_assert_eq!(rank_key(&a).cmp(&rank_key(&b)), a.rank_cmp(&b));
            // Every score but -0.0 and NaNs decodes from its key bit for bit.
            let decoded = score_of_descending_key(descending_key(first));
            if !first.is_nan() && first.to_bits() != (-0.0f32).to_bits() {
                prop_assert_eq!(decoded.to_bits(), first.to_bits());
            }
        }

        #[test]
        fn write_best_sorted_equals_a_sort_by_rank_cmp(
            scores in proptest::collection::vec(any_score(), 0..300),
            k in 1usize..320,
        ) {
            // Duplicate indexes too (a candidate listed twice), with the same score bits.
            let items: Vec<ScoredItem> = (0..scores.len())
                .map(|i| ScoredItem::new((i % 150) as u32, scores[i % 150]))
                .collect();
            // The oracle: a stable sort with `rank_cmp`, cut to `k`.
            let mut expected = items.clone();
            expected.sort_by(ScoredItem::rank_cmp);
            expected.truncate(k);
            let (mut keys, mut got) = (Vec::new(), Vec::new());
            write_best_sorted(&items, k, &mut keys, &mut got);
            prop_assert_eq!(got.len(), expected.len());
            for (got, want) in got.iter().zip(&expected) {
                // Items that compare equal differ at most in the sign of a zero or a NaN's
                // payload, and those take the general path: compare the bits.
                prop_assert_eq!((got.index, got.score.to_bits()), (want.index, want.score.to_bits()));
            }
        }

        #[test]
        fn heap_keeps_the_best_k(scores in proptest::collection::vec(-4i8..4, 0..200), k in 1usize..50) {
            // Small integer scores force many exact ties.
            let items: Vec<ScoredItem> = scores
                .iter()
                .enumerate()
                .map(|(i, &s)| ScoredItem::new(i as u32, f32::from(s)))
                .collect();
            let mut heap = TopKHeap::default();
            heap.reset(k);
            // Offer in a scrambled order: the result must not depend on it.
            for step in 0..items.len() {
                heap.offer(items[(step * 7919) % items.len()]);
            }
            let mut got = Vec::new();
            heap.write_sorted(&mut got);
            let mut expected = items.clone();
            sort_ranked(&mut expected);
            expected.truncate(k);
            prop_assert_eq!(got, expected);
        }
    }
}
