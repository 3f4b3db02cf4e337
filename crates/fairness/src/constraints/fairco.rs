//! `fairco`: the FairCo controller for amortized fairness of exposure (Morik, Singh, Hong,
//! Joachims, SIGIR 2020; reference code `MarcoMorik/Dynamic-Fairness`).
//!
//! At the `tau`-th ranking every item gets the score `sigma(d) = R(d) + lambda * err(d)` with
//! `err(d) = (tau - 1) * max_G (Exp(G) / Merit(G) - Exp(G(d)) / Merit(G(d)))`, where `Exp(G)`
//! and `Merit(G)` are the group's position-weighted exposure and estimated relevance averaged
//! over the past rankings. Per ranking, a group's exposure is the mean over its items in the
//! pool of `1 / log2(1 + rank)` (0 beyond the top k) and its merit is the mean relevance
//! estimate of its items in the pool; the ratio of the cumulative sums equals the ratio of
//! the averages, so the state keeps sums plus the ranking count `tau - 1`. Merits use the
//! scores clamped at 0 (FairCo needs non-negative merits, e.g. calibrated probabilities); the
//! ranking itself sorts by the raw score plus `lambda * err(d)`, unclamped, as the reference
//! controller does (Morik et al.'s `controller_rank`: `weighted_popularity + KP * e_p`).
//! Groups without accumulated merit get no correction yet.
//!
//! The gain `lambda` is at most [`MAX_LAMBDA`] (`1e6`), and the correction is never NaN or
//! infinite, even where `lambda * (tau - 1) * gap` would overflow (such a gap separates two
//! tiers, below; a group whose merit is so small that its exposure per merit is infinite
//! counts as the most exposed).
//!
//! **Groups of near-zero merit.** A group whose merit is tiny but positive (`1e-20` beside
//! merits near `0.5`) has an exposure per merit near `1e19` once it has been shown. Evaluated
//! as written, every other group's correction `lambda * (tau - 1) * (1e19 - ratio)` then
//! rounds to the same f64, and so does `score + correction`: the differences between the other
//! groups and their scores were lost, and the best-scored group took every slot. (The
//! reference code never meets this: its `get_unfairness` floors each group's merit at `1e-4`.
//! A floor here would change the correction of every group with a smaller merit, such as
//! calibrated probabilities of rare events, so it is not used.) The ranking by
//! `score + lambda * err(d)` does not change when the same constant is added to every item's
//! correction, and a correction gap `lambda * (tau - 1) * (r' - r)` between two groups that
//! exceeds every score difference of the pool decides the order of their items outright. So
//! the pool's groups are sorted by exposure per merit and split into tiers wherever two
//! neighbours are separated by a correction gap above `2^26 W` ([`TIER_GAP`]; `W` is twice
//! the sum of the pool's score spread and its largest score magnitude, [`score_scale`]).
//! Every item of a lower tier ranks before every item of a higher one, as in exact
//! arithmetic, and within a tier the correction is taken from the tier's own largest ratio
//! instead of the largest of all (the paper's correction minus one constant per tier), so a
//! huge ratio never enters the other groups' corrections.
//!
//! Without such a gap, which covers ordinary states (it takes `lambda * (tau - 1)` times the
//! spread of the ratios above `2^26 W`, about `2.7e8` for scores in `[0, 1]`), there is one
//! tier and the correction is the paper's formula evaluated exactly as before, bit for bit.
//! With several tiers the order is still the paper's in exact arithmetic; it can differ from
//! the old evaluation only where that decided a near-tie by its own rounding, which for
//! corrections above `2^26 W` is `2^-27 W` or coarser. Either way every correction is finite
//! and non-negative.

use crate::candidate::{Candidate, dcg_weight, validate_pool};
use crate::error::FairnessError;
use crate::reranker::{AmortizedState, RerankOutput, Reranker};
use crate::summary::PoolSummary;

/// Above this many distinct groups in a pool, the ranking uses a selection over all items
/// instead of a per-group merge.
const MERGE_GROUP_LIMIT: usize = 16;

/// Largest controller gain `lambda` [`FairCo::new`] accepts: `1e6`.
///
/// FairCo's gain weighs the exposure-per-merit gap against relevance estimates in `[0, 1]`
/// (calibrated probabilities, as the method assumes). The reference code compares gains from
/// `1e-4` to `100` (`MarcoMorik/Dynamic-Fairness`, `compare_controller_LP`; its default
/// `KP` is `0.01`). At `1e6` a gap of `1e-6` after a single ranking already outweighs the
/// whole score range, so larger gains change no ranking a sensible gain would not, and
/// gains near `f64::MAX` only make `lambda * (tau - 1)` overflow (which once turned the
/// boost into NaN and handed every slot to the most exposed group). Scores on a much larger
/// scale than `[0, 1]` should be rescaled rather than met with a larger gain.
pub const MAX_LAMBDA: f64 = 1e6;

/// FairCo with controller gain `lambda`.
#[derive(Debug, Clone)]
pub struct FairCo {
    lambda: f64,
}

impl FairCo {
    /// A controller with gain `0 <= lambda <= MAX_LAMBDA` (0 gives the score order).
    pub fn new(lambda: f64) -> Result<Self, String> {
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(format!(
                "lambda = {lambda} must be a finite number from 0 to {MAX_LAMBDA:e}"
            ));
        }
        if lambda > MAX_LAMBDA {
            return Err(format!(
                "lambda = {lambda:e} is above the maximum {MAX_LAMBDA:e} (gains from 1e-4 to \
                 100 are typical for relevance estimates in [0, 1])"
            ));
        }
        Ok(Self { lambda })
    }
}

/// The controller's boost for a group whose exposure per merit is `own`, when the largest
/// is `best`, after `past` rankings: `lambda * past * (best - own)`, saturating. A group at
/// the best ratio (including an infinite one: merit so small that the ratio overflows) gets
/// 0; a group below it gets the product, or `f64::MAX` where the product (or the gap)
/// overflows. Never NaN or infinite, so the ranking by `score + boost` keeps its meaning.
fn saturating_boost(lambda: f64, past: f64, best: f64, own: f64) -> f64 {
    // `own <= best` for every group; equal (an infinite best included) means no gap.
    if own >= best {
        return 0.0;
    }
    let boost = lambda * past * (best - own);
    if boost.is_finite() {
        boost
    } else if boost.is_nan() {
        // An infinite product times a zero factor: no gain or no history, no boost.
        0.0
    } else {
        f64::MAX
    }
}

/// Two neighbouring exposure-per-merit ratios `r < r'` whose correction gap
/// `lambda * (tau - 1) * (r' - r)` exceeds `TIER_GAP` times the pool's score scale `W`
/// ([`score_scale`]) put their groups in different tiers: `2^26`.
///
/// Such a gap exceeds every score difference of the pool `2^27`-fold, so in exact arithmetic
/// every item of the less exposed group ranks before every item of the other, whatever their
/// scores: ranking the tiers one after the other changes no comparison. Below it the paper's
/// formula is evaluated as it stands: a key `score + correction` of `2^26 W` is rounded in
/// units of at most `2^-26 W`, about the spacing of the f32 scores near the largest of them
/// (which is at least `W / 6`), so such gaps cost the keys no real resolution.
const TIER_GAP: f64 = 67_108_864.0;

/// `W`, the score scale of a pool in score order: `2 * (spread + largest |score|)`, so every
/// difference of two scores of the pool is at most `W / 2`; 0 for an empty pool or one
/// whose scores are all 0.
fn score_scale(pool: &[Candidate]) -> f64 {
    let (Some(first), Some(last)) = (pool.first(), pool.last()) else {
        return 0.0;
    };
    let (high, low) = (f64::from(first.score), f64::from(last.score));
    2.0 * ((high - low) + high.abs().max(low.abs()))
}

/// One ranking's controller: gain `lambda`, `past` rankings (`tau - 1`), the largest exposure
/// per merit of any group in the state (`best`, `-inf` if no group has merit yet) and the
/// pool's score scale ([`score_scale`]).
#[derive(Debug, Clone, Copy)]
struct Controller {
    lambda: f64,
    past: f64,
    best: f64,
    scale: f64,
}

impl Controller {
    /// Whether this ranking is corrected at all: a gain, a past and a group with merit.
    fn corrects(&self) -> bool {
        self.lambda > 0.0 && self.past > 0.0 && self.best > f64::NEG_INFINITY
    }

    /// Whether the correction gap from ratio `low` up to ratio `high` decides the order of
    /// the two groups' items outright ([`TIER_GAP`]). Never true for equal ratios (two
    /// infinite ones included), always for a finite ratio below an infinite one.
    fn decisive(&self, low: f64, high: f64) -> bool {
        high > low && self.lambda * self.past * (high - low) > TIER_GAP * self.scale
    }

    /// The correction of each pool group, from its exposure per merit `ratios[g]` (`best`
    /// for a group without merit): `tiers[g]` and `boosts[g]`, such that ranking the items
    /// by tier (lowest first), then by `score + boost` (highest first), is the ranking by
    /// `score + lambda * past * (best - ratio)` of the paper. Returns the number of tiers.
    ///
    /// Without a decisive gap ([`Controller::decisive`]) between the lowest ratio and
    /// `best` there is one tier and `boosts[g] = lambda * past * (best - ratios[g])`, the
    /// paper's formula evaluated as it stands ([`saturating_boost`]). Otherwise the ratios
    /// are sorted and split at every decisive gap between neighbours: lower ratios form
    /// lower tiers, and each tier's boosts are `lambda * past * (top - ratios[g])` with
    /// `top` its largest ratio (`best` for the highest tier when no decisive gap separates
    /// them). Within a tier that differs from the paper's correction by the same constant
    /// for every item, which changes no comparison, and it keeps a near-zero merit's huge
    /// ratio out of the other groups' corrections, where it used to round their
    /// differences (and their scores) away. Every boost is finite and non-negative: at
    /// most `(groups - 1) * 2^26 W` (rounding aside), or 0.
    fn corrections(
        &self,
        ratios: &[f64],
        boosts: &mut Vec<f64>,
        tiers: &mut Vec<u32>,
        sorted: &mut Vec<(f64, usize)>,
    ) -> u32 {
        boosts.clear();
        boosts.resize(ratios.len(), 0.0);
        tiers.clear();
        tiers.resize(ratios.len(), 0);
        if !self.corrects() {
            return 1;
        }
        let Self {
            lambda, past, best, ..
        } = *self;
        let lowest = ratios.iter().copied().fold(best, f64::min);
        if !self.decisive(lowest, best) {
            for (boost, &own) in boosts.iter_mut().zip(ratios) {
                *boost = saturating_boost(lambda, past, best, own);
            }
            return 1;
        }
        sorted.clear();
        sorted.extend(ratios.iter().copied().zip(0..));
        sorted.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let mut tier = 0;
        let mut start = 0;
        for end in 1..=sorted.len() {
            let top = sorted[end - 1].0;
            if let Some(&(next, _)) = sorted.get(end)
                && !self.decisive(top, next)
            {
                continue;
            }
            let anchor = if end == sorted.len() && !self.decisive(top, best) {
                best
            } else {
                top
            };
            for &(own, group) in &sorted[start..end] {
                boosts[group] = saturating_boost(lambda, past, anchor, own);
                tiers[group] = tier;
            }
            tier += 1;
            start = end;
        }
        tier
    }
}

/// Sorts the first `length` keys by `by_rank` to the front of `keys` (the order beyond them
/// is unspecified); with `length` 0 or at least `keys.len()`, sorts them all.
fn select_first<T>(
    keys: &mut Vec<T>,
    length: usize,
    by_rank: impl Fn(&T, &T) -> std::cmp::Ordering + Copy,
) {
    if length < keys.len() && length > 0 {
        keys.select_nth_unstable_by(length - 1, by_rank);
        keys.truncate(length);
    }
    keys.sort_unstable_by(by_rank);
}

/// Labels below this bound map to their group index through a fixed array.
const SMALL_LABELS: usize = 64;

/// Marks a small label not seen yet.
const NO_GROUP: u32 = u32::MAX;

/// Group index of `label`: by the `small` array for labels below [`SMALL_LABELS`], else by
/// `index_of` once it is in use (many groups), else by a linear scan of `labels`.
fn group_index(
    label: u32,
    small: &[u32; SMALL_LABELS],
    labels: &[u32],
    index_of: &std::collections::HashMap<u32, usize>,
) -> Option<usize> {
    match small.get(label as usize) {
        Some(&index) => (index != NO_GROUP).then_some(index as usize),
        None if !index_of.is_empty() => index_of.get(&label).copied(),
        None => labels.iter().position(|&known| known == label),
    }
}

/// The largest difference between two groups' cumulative exposure per unit of merit.
pub fn amortized_disparity(state: &AmortizedState) -> Option<f64> {
    let mut low = f64::INFINITY;
    let mut high = f64::NEG_INFINITY;
    for (group, &merit) in &state.group_relevance {
        if merit > 0.0 {
            let ratio = state.group_exposure.get(group).copied().unwrap_or(0.0) / merit;
            low = low.min(ratio);
            high = high.max(ratio);
        }
    }
    (high >= low).then_some(high - low)
}

/// Whether every partial sum of the pool's relevance estimates (scores clamped at 0, as
/// `f64`), in any order and over any subset, is exact, so that every summation order gives
/// the same bits.
///
/// Every positive estimate is a multiple of `2^q`, the unit in the last place of the
/// smallest positive score as an `f32` (the pool is in score order, so that is the last
/// positive one); a sum of such multiples is exact in `f64` while it stays below
/// `2^(53 + q)`. The total is at most (positive items) * (largest score); this asks it to
/// stay below `2^(52 + q)`, a factor of 2 over the rounding of that bound. Zero and negative
/// scores add `+-0.0`, which changes no sum that starts at `+0.0`.
fn sums_are_exact(pool: &[Candidate]) -> bool {
    let positive = pool.partition_point(|candidate| candidate.score > 0.0);
    let (Some(largest), Some(smallest)) = (
        pool.first(),
        positive.checked_sub(1).and_then(|last| pool.get(last)),
    ) else {
        return true;
    };
    let biased = (smallest.score.to_bits() >> 23) & 0xff;
    // Subnormal f32 values are multiples of 2^-149 = 2^(-126 - 23).
    let exponent = if biased == 0 {
        -126
    } else {
        biased as i32 - 127
    };
    let quantum = exponent - 23;
    (positive as f64) * f64::from(largest.score) < 2f64.powi(52 + quantum)
}

/// The pool pass of one call: per group (in order of first appearance) its label, pool size,
/// relevance sum (in pool order) and first `length` pool positions.
struct PoolPass<'s> {
    labels: &'s mut Vec<u32>,
    sizes: &'s mut Vec<usize>,
    relevance: &'s mut Vec<f64>,
    lists: &'s mut Vec<Vec<usize>>,
    index_of: &'s mut std::collections::HashMap<u32, usize>,
    small: &'s mut [u32; SMALL_LABELS],
    length: usize,
}

impl PoolPass<'_> {
    /// The pass, with sizes and relevance sums in local arrays while every label is below
    /// [`SMALL_LABELS`]; from the first larger label on, [`PoolPass::scan_reference`]. The
    /// results equal the reference pass bit for bit: when [`sums_are_exact`] holds, every
    /// partial sum is exact, so the sums may be split over independent lanes (no
    /// dependency from one item to the next); otherwise each group is summed in pool order.
    fn scan(&mut self, pool: &[Candidate]) {
        if sums_are_exact(pool) {
            self.scan_lanes::<4>(pool);
        } else {
            self.scan_lanes::<1>(pool);
        }
    }

    /// [`PoolPass::scan`] with item `i` summed into lane `i % LANES`.
    fn scan_lanes<const LANES: usize>(&mut self, pool: &[Candidate]) {
        let mut sizes = [[0usize; SMALL_LABELS]; LANES];
        let mut relevance = [[0.0f64; SMALL_LABELS]; LANES];
        // Bit `g`: group `g` exists; group `g`'s list holds its first `length` positions.
        let (mut known, mut full) = (0u64, 0u64);
        let mut stop = pool.len();
        let mut position = 0;
        'pass: while position < pool.len() {
            // Filling the lists, until every group found so far has its first items.
            while let Some(candidate) = pool.get(position) {
                let label = candidate.group as usize;
                let Some(&slot) = self.small.get(label) else {
                    stop = position;
                    break 'pass;
                };
                let index = if slot == NO_GROUP {
                    let index = self.register(candidate.group, &mut full);
                    known |= 1u64 << (index % SMALL_LABELS);
                    index
                } else {
                    slot as usize
                } % SMALL_LABELS;
                let lane = position % LANES;
                sizes[lane][index] += 1;
                relevance[lane][index] += f64::from(candidate.score).max(0.0);
                if full & (1u64 << index) == 0 {
                    let list = &mut self.lists[index];
                    list.push(position);
                    if list.len() >= self.length {
                        full |= 1u64 << index;
                    }
                }
                position += 1;
                if full == known {
                    break;
                }
            }
            // Only sums, while no new group appears: `LANES` items at a time (any lane
            // assignment gives the same sums when there are several lanes, see `scan`), then
            // one at a time from an item whose label needs a closer look.
            if LANES > 1 {
                while let Some(chunk) = pool.get(position..position + LANES) {
                    let mut slots = [0usize; LANES];
                    let mut known_labels = true;
                    for (slot, candidate) in slots.iter_mut().zip(chunk) {
                        match self.small.get(candidate.group as usize) {
                            Some(&index) if index != NO_GROUP => *slot = index as usize,
                            _ => known_labels = false,
                        }
                    }
                    if !known_labels {
                        break;
                    }
                    for (lane, (&slot, candidate)) in slots.iter().zip(chunk).enumerate() {
                        let index = slot % SMALL_LABELS;
                        sizes[lane][index] += 1;
                        relevance[lane][index] += f64::from(candidate.score).max(0.0);
                    }
                    position += LANES;
                }
            }
            while let Some(candidate) = pool.get(position) {
                let label = candidate.group as usize;
                let Some(&slot) = self.small.get(label) else {
                    stop = position;
                    break 'pass;
                };
                if slot == NO_GROUP {
                    continue 'pass;
                }
                let index = slot as usize % SMALL_LABELS;
                let lane = position % LANES;
                sizes[lane][index] += 1;
                relevance[lane][index] += f64::from(candidate.score).max(0.0);
                position += 1;
            }
        }
        for (index, (size, sum)) in self
            .sizes
            .iter_mut()
            .zip(self.relevance.iter_mut())
            .enumerate()
        {
            let index = index % SMALL_LABELS;
            *size = sizes.iter().map(|lane| lane[index]).sum();
            // One lane: the plain sum; several: exact, so the order does not matter.
            *sum = relevance[1..]
                .iter()
                .fold(relevance[0][index], |total, lane| total + lane[index]);
        }
        if stop < pool.len() {
            self.scan_reference(pool, stop);
        }
    }

    /// The pass with the group sizes known from `summary` (every label below
    /// [`SMALL_LABELS`], at most [`MERGE_GROUP_LIMIT`] groups): only the relevance sums and
    /// the first positions remain, and the sums stop at the last positive score, since the
    /// items after it add `+-0.0` (no change to a sum that starts at `+0.0`). Equal to
    /// [`PoolPass::scan_reference`] bit for bit, like [`PoolPass::scan`]; the groups are
    /// indexed in label order instead of order of appearance, which no result depends on.
    /// Fails if the pool holds a label the summary does not list.
    fn scan_summarized(
        &mut self,
        pool: &[Candidate],
        summary: &PoolSummary,
    ) -> Result<(), FairnessError> {
        if sums_are_exact(pool) {
            self.scan_summarized_lanes::<4>(pool, summary)
        } else {
            self.scan_summarized_lanes::<1>(pool, summary)
        }
    }

    /// [`PoolPass::scan_summarized`] with item `i` summed into lane `i % LANES`.
    fn scan_summarized_lanes<const LANES: usize>(
        &mut self,
        pool: &[Candidate],
        summary: &PoolSummary,
    ) -> Result<(), FairnessError> {
        let unlisted = |position: usize| FairnessError::InvalidInput {
            function: "rerank_summarized",
            reason: format!("pool position {position} has a group the pool summary lacks"),
        };
        let mut full = 0u64;
        let mut known = 0u64;
        // List length each group needs: its first `length` positions, or all of them.
        let mut wanted = [0usize; SMALL_LABELS];
        for &(label, size) in summary.groups() {
            let index = self.register(label, &mut full) % SMALL_LABELS;
            self.sizes[index] = size;
            known |= 1u64 << index;
            wanted[index] = size.min(self.length);
            if wanted[index] == 0 {
                full |= 1u64 << index;
            }
        }
        let mut relevance = [[0.0f64; SMALL_LABELS]; LANES];
        let positive = pool.partition_point(|candidate| candidate.score > 0.0);
        let mut position = 0;
        // Filling the lists (and summing) until every group has the positions it needs.
        while full != known {
            let Some(candidate) = pool.get(position) else {
                break;
            };
            let slot = self.small.get(candidate.group as usize).copied();
            let index = match slot {
                Some(slot) if slot != NO_GROUP => slot as usize % SMALL_LABELS,
                _ => return Err(unlisted(position)),
            };
            relevance[position % LANES][index] += f64::from(candidate.score).max(0.0);
            if full & (1u64 << index) == 0 {
                let list = &mut self.lists[index];
                list.push(position);
                if list.len() >= wanted[index] {
                    full |= 1u64 << index;
                }
            }
            position += 1;
        }
        // Only sums, over the rest of the positive scores. With exact sums (several lanes)
        // and two groups, in registers: 8 lanes per group, every item adding its score to
        // its group and `+0.0` to the other (no change), so no item waits on the previous.
        if LANES > 1
            && let &[(first, _), (second, _)] = summary.groups()
            && let (Some(&first_slot), Some(&second_slot)) = (
                self.small.get(first as usize),
                self.small.get(second as usize),
            )
            && first_slot != NO_GROUP
            && second_slot != NO_GROUP
            && position < positive
        {
            let rest = &pool[position..positive];
            let (mut first_sums, mut second_sums) = ([0.0f64; 8], [0.0f64; 8]);
            let mut unlisted_label = false;
            let mut chunks = rest.chunks_exact(8);
            for chunk in &mut chunks {
                for (lane, candidate) in chunk.iter().enumerate() {
                    let score = f64::from(candidate.score);
                    let (is_first, is_second) =
                        (candidate.group == first, candidate.group == second);
                    first_sums[lane] += if is_first { score } else { 0.0 };
                    second_sums[lane] += if is_second { score } else { 0.0 };
                    unlisted_label |= !(is_first | is_second);
                }
            }
            for candidate in chunks.remainder() {
                let score = f64::from(candidate.score);
                let (is_first, is_second) = (candidate.group == first, candidate.group == second);
                first_sums[0] += if is_first { score } else { 0.0 };
                second_sums[0] += if is_second { score } else { 0.0 };
                unlisted_label |= !(is_first | is_second);
            }
            if unlisted_label {
                let offset = rest
                    .iter()
                    .position(|candidate| candidate.group != first && candidate.group != second)
                    .unwrap_or(0);
                return Err(unlisted(position + offset));
            }
            for (slot, sums) in [(first_slot, first_sums), (second_slot, second_sums)] {
                let total = sums.iter().fold(0.0, |total, &sum| total + sum);
                relevance[0][slot as usize % SMALL_LABELS] += total;
            }
            position = positive;
        }
        while position < positive {
            let end = (position + LANES).min(positive);
            let chunk = &pool[position..end];
            if chunk.len() == LANES {
                let mut slots = [0usize; LANES];
                let mut listed = true;
                for (slot, candidate) in slots.iter_mut().zip(chunk) {
                    match self.small.get(candidate.group as usize) {
                        Some(&index) if index != NO_GROUP => *slot = index as usize,
                        _ => listed = false,
                    }
                }
                if listed {
                    for (lane, (&slot, candidate)) in slots.iter().zip(chunk).enumerate() {
                        relevance[lane][slot % SMALL_LABELS] += f64::from(candidate.score);
                    }
                    position += LANES;
                    continue;
                }
            }
            for (offset, candidate) in chunk.iter().enumerate() {
                let index = match self.small.get(candidate.group as usize) {
                    Some(&index) if index != NO_GROUP => index as usize % SMALL_LABELS,
                    _ => return Err(unlisted(position + offset)),
                };
                relevance[(position + offset) % LANES][index] += f64::from(candidate.score);
            }
            position = end;
        }
        for (index, sum) in self.relevance.iter_mut().enumerate() {
            let index = index % SMALL_LABELS;
            // One lane: the plain sum; several: exact, so the order does not matter.
            *sum = relevance[1..]
                .iter()
                .fold(relevance[0][index], |total, lane| total + lane[index]);
        }
        Ok(())
    }

    /// A new group for a label below [`SMALL_LABELS`] (only such labels were seen so far,
    /// so the hashed index for large labels stays empty, as in the reference pass).
    fn register(&mut self, label: u32, full: &mut u64) -> usize {
        self.labels.push(label);
        self.sizes.push(0);
        self.relevance.push(0.0);
        let index = self.labels.len() - 1;
        if self.lists.len() <= index {
            self.lists.push(Vec::new());
        }
        self.lists[index].clear();
        if self.length == 0 {
            *full |= 1u64 << (index % SMALL_LABELS);
        }
        if let Some(slot) = self.small.get_mut(label as usize) {
            *slot = index as u32;
        }
        index
    }

    /// The original pass (the test oracle of [`PoolPass::scan`]) from pool position `from`
    /// on, continuing the groups found before it.
    fn scan_reference(&mut self, pool: &[Candidate], from: usize) {
        let Self {
            labels,
            sizes,
            relevance,
            lists,
            index_of,
            small,
            length,
        } = self;
        let (small, length) = (&mut **small, *length);
        for (position, candidate) in pool.iter().enumerate().skip(from) {
            let label = candidate.group;
            let index = match small.get(label as usize) {
                Some(&index) if index != NO_GROUP => index as usize,
                _ => {
                    let index = match group_index(label, small, labels, index_of) {
                        Some(index) => index,
                        None => {
                            labels.push(label);
                            sizes.push(0);
                            relevance.push(0.0);
                            if lists.len() < labels.len() {
                                lists.push(Vec::new());
                            }
                            lists[labels.len() - 1].clear();
                            let index = labels.len() - 1;
                            if labels.len() > MERGE_GROUP_LIMIT {
                                // Many groups: large labels are looked up by hash from now on.
                                if index_of.is_empty() {
                                    index_of.extend(
                                        labels
                                            .iter()
                                            .enumerate()
                                            .filter(|&(_, &known)| (known as usize) >= SMALL_LABELS)
                                            .map(|(index, &known)| (known, index)),
                                    );
                                } else if (label as usize) >= SMALL_LABELS {
                                    index_of.insert(label, index);
                                }
                            }
                            index
                        }
                    };
                    if let Some(slot) = small.get_mut(label as usize) {
                        *slot = index as u32;
                    }
                    index
                }
            };
            sizes[index] += 1;
            relevance[index] += f64::from(candidate.score).max(0.0);
            if lists[index].len() < length {
                lists[index].push(position);
            }
        }
    }
}

impl Reranker for FairCo {
    fn name(&self) -> &str {
        "fairco"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name(), "lambda": self.lambda })
    }

    fn is_amortized(&self) -> bool {
        true
    }

    fn rerank(
        &self,
        pool: &[Candidate],
        k: usize,
        state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        self.solve(pool, None, k, state, out, false)
    }

    fn rerank_summarized(
        &self,
        pool: &[Candidate],
        summary: &PoolSummary,
        k: usize,
        state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        summary.check(pool)?;
        self.solve(pool, Some(summary), k, state, out, false)
    }
}

impl FairCo {
    /// The re-ranking; `reference` selects the original pool pass (the test oracle), a
    /// `summary` (when its labels suit [`PoolPass::scan_summarized`]) the pass without counting.
    fn solve(
        &self,
        pool: &[Candidate],
        summary: Option<&PoolSummary>,
        k: usize,
        state: Option<&AmortizedState>,
        out: &mut RerankOutput,
        reference: bool,
    ) -> Result<(), FairnessError> {
        out.reset();
        validate_pool(pool)?;
        if let Some(state) = state {
            state.validate()?;
        }
        let mut next_state = out.state.take().unwrap_or_default();
        match state {
            Some(state) => next_state.clone_from(state),
            None => {
                next_state.group_exposure.clear();
                next_state.group_relevance.clear();
                next_state.rankings = 0;
            }
        }
        let length = k.min(pool.len());
        let RerankOutput {
            order,
            report,
            scratch,
            ..
        } = out;

        // Per-group item counts and relevance sums over the pool, and each group's first
        // `length` pool positions (enough for the merge), in one pass. Labels below
        // `SMALL_LABELS` find their group index by direct lookup.
        let labels = &mut scratch.labels;
        let sizes = &mut scratch.counts;
        let relevance = &mut scratch.values;
        let lists = &mut scratch.lists;
        labels.clear();
        sizes.clear();
        relevance.clear();
        let index_of = &mut scratch.label_index;
        index_of.clear();
        let mut small = [NO_GROUP; SMALL_LABELS];
        let mut pass = PoolPass {
            labels,
            sizes,
            relevance,
            lists,
            index_of,
            small: &mut small,
            length,
        };
        let summary = summary.filter(|summary| {
            summary.groups().len() <= MERGE_GROUP_LIMIT
                && summary
                    .groups()
                    .iter()
                    .all(|&(label, _)| (label as usize) < SMALL_LABELS)
        });
        if reference {
            pass.scan_reference(pool, 0);
        } else if let Some(summary) = summary {
            pass.scan_summarized(pool, summary)?;
        } else {
            pass.scan(pool);
        }
        let many_groups = labels.len() > MERGE_GROUP_LIMIT;
        // Group index of a label of the pool (every one is known by now).
        let dense_of = |label: u32| -> usize {
            group_index(label, &small, labels, index_of).unwrap_or_default()
        };

        // Controller boost and tier per group from the state before this ranking.
        let boosts = &mut scratch.values2;
        let tiers = &mut scratch.tiers;
        let past = next_state.rankings as f64;
        let ratio = |group: u32| -> Option<f64> {
            let merit = next_state
                .group_relevance
                .get(&group)
                .copied()
                .unwrap_or(0.0);
            (merit > 0.0).then(|| {
                next_state
                    .group_exposure
                    .get(&group)
                    .copied()
                    .unwrap_or(0.0)
                    / merit
            })
        };
        let best_ratio = next_state
            .group_relevance
            .keys()
            .filter_map(|&group| ratio(group))
            .fold(f64::NEG_INFINITY, f64::max);
        let controller = Controller {
            lambda: self.lambda,
            past,
            best: best_ratio,
            scale: score_scale(pool),
        };
        // `best_ratio` is -inf when no group has merit yet (no correction), +inf when a merit
        // is so small that its group's ratio overflows.
        let ratios = &mut scratch.values3;
        ratios.clear();
        if controller.corrects() {
            // A group without merit counts as at the best ratio: no correction, as before.
            ratios.extend(
                labels
                    .iter()
                    .map(|&label| ratio(label).unwrap_or(best_ratio)),
            );
        } else {
            ratios.resize(labels.len(), 0.0);
        }
        let tier_count = controller.corrections(ratios, boosts, tiers, &mut scratch.heap);

        // Rank by tier (lowest first), then boosted score, ties by pool position.
        if !many_groups {
            let cursors = &mut scratch.counts2;
            cursors.clear();
            cursors.resize(labels.len(), 0);
            for _ in 0..length {
                let mut best: Option<(u32, usize, f64, usize)> = None;
                for (index, list) in lists.iter().enumerate().take(labels.len()) {
                    let Some(&position) = list.get(cursors[index]) else {
                        continue;
                    };
                    let tier = tiers[index];
                    let boosted = f64::from(pool[position].score) + boosts[index];
                    if best.is_none_or(|(best_tier, _, value, best_position)| {
                        tier < best_tier
                            || (tier == best_tier
                                && (boosted > value
                                    || (boosted == value && position < best_position)))
                    }) {
                        best = Some((tier, index, boosted, position));
                    }
                }
                let Some((_, index, _, position)) = best else {
                    break;
                };
                cursors[index] += 1;
                order.push(position);
            }
        } else if tier_count == 1 {
            let keys = &mut scratch.heap;
            keys.clear();
            keys.extend(pool.iter().enumerate().map(|(position, candidate)| {
                (
                    f64::from(candidate.score) + boosts[dense_of(candidate.group)],
                    position,
                )
            }));
            select_first(keys, length, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            order.extend(keys.iter().take(length).map(|&(_, position)| position));
        } else {
            let keys = &mut scratch.tiered;
            keys.clear();
            keys.extend(pool.iter().enumerate().map(|(position, candidate)| {
                let group = dense_of(candidate.group);
                (
                    tiers[group],
                    f64::from(candidate.score) + boosts[group],
                    position,
                )
            }));
            select_first(keys, length, |a, b| {
                a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2))
            });
            order.extend(keys.iter().take(length).map(|&(_, _, position)| position));
        }

        // Update the state with this ranking's mean exposure and merit per group.
        let exposure = &mut scratch.values3;
        exposure.clear();
        exposure.resize(labels.len(), 0.0);
        for (rank, &position) in order.iter().enumerate() {
            exposure[dense_of(pool[position].group)] += dcg_weight(rank + 1);
        }
        for (index, &label) in labels.iter().enumerate() {
            let size = sizes[index] as f64;
            *next_state.group_exposure.entry(label).or_insert(0.0) += exposure[index] / size;
            *next_state.group_relevance.entry(label).or_insert(0.0) += relevance[index] / size;
        }
        // Saturating: a state may come from outside (a file, a request) with any count.
        next_state.rankings = next_state.rankings.saturating_add(1);
        report.amortized_disparity = amortized_disparity(&next_state);
        out.state = Some(next_state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::rng;

    #[test]
    fn first_ranking_is_the_score_order_and_state_accumulates_means() {
        let pool = vec![
            Candidate::new(0, 0.9, 0),
            Candidate::new(1, 0.8, 0),
            Candidate::new(2, 0.7, 1),
            Candidate::new(3, 0.1, 1),
        ];
        let ranker = FairCo::new(1.0).expect("valid");
        let mut out = RerankOutput::new();
        ranker
            .rerank(&pool, 2, None, &mut rng(0), &mut out)
            .expect("reranks");
        assert_eq!(out.order, vec![0, 1]);
        let state = out.state.clone().expect("amortized state");
        assert_eq!(state.rankings, 1);
        let expected_exposure = (dcg_weight(1) + dcg_weight(2)) / 2.0;
        assert!((state.group_exposure[&0] - expected_exposure).abs() < 1e-12);
        assert_eq!(state.group_exposure[&1], 0.0);
        assert!((state.group_relevance[&0] - 0.85).abs() < 1e-6);
        assert!((state.group_relevance[&1] - 0.4).abs() < 1e-6);
    }

    #[test]
    fn controller_drives_exposure_per_merit_towards_parity() {
        // Group 1 is slightly less relevant, so score order starves it of exposure.
        let pool: Vec<Candidate> = (0..20)
            .map(|i| Candidate::new(i, 1.0 - 0.01 * i as f32, u32::from(i % 2 == 1 && i > 4)))
            .collect();
        let mut pool = pool;
        pool.sort_by(|a, b| b.score.total_cmp(&a.score));
        let ranker = FairCo::new(0.05).expect("valid");
        let mut out = RerankOutput::new();
        let mut state: Option<AmortizedState> = None;
        let mut disparities = Vec::new();
        for _ in 0..300 {
            ranker
                .rerank(&pool, 5, state.as_ref(), &mut rng(0), &mut out)
                .expect("reranks");
            state = out.state.clone();
            disparities.push(
                out.report
                    .amortized_disparity
                    .expect("two groups with merit"),
            );
        }
        let unfair = FairCo::new(0.0).expect("valid");
        let mut baseline: Option<AmortizedState> = None;
        for _ in 0..300 {
            unfair
                .rerank(&pool, 5, baseline.as_ref(), &mut rng(0), &mut out)
                .expect("reranks");
            baseline = out.state.clone();
        }
        let baseline_disparity = out.report.amortized_disparity.expect("disparity");
        let last = disparities[disparities.len() - 1];
        assert!(
            last < 0.25 * baseline_disparity,
            "controller {last} vs score order {baseline_disparity}"
        );
    }

    /// The auditor's pool: group 0 for positions 0 to 2, group 1 for 3 to 5, scores
    /// `1 - 0.1 i`.
    fn auditor_pool() -> Vec<Candidate> {
        (0..6)
            .map(|i| Candidate::new(i, 1.0 - 0.1 * i as f32, u32::from(i >= 3)))
            .collect()
    }

    /// After two rankings, group `0` has exposure `exposure_0` per merit `relevance_0`;
    /// group 1 has 0.5 per 1 (less, as long as `exposure_0 / relevance_0 > 0.5`).
    fn auditor_state(exposure_0: f64, relevance_0: f64) -> AmortizedState {
        let mut state = AmortizedState::default();
        state.group_exposure.extend([(0, exposure_0), (1, 0.5)]);
        state.group_relevance.extend([(0, relevance_0), (1, 1.0)]);
        state.rankings = 2;
        state
    }

    /// The order of the auditor's pool at k = 3, by `rerank` and by `rerank_summarized`
    /// (which must agree).
    fn auditor_order(lambda: f64, state: &AmortizedState) -> Vec<usize> {
        let pool = auditor_pool();
        let ranker = FairCo::new(lambda).expect("an accepted gain");
        let mut out = RerankOutput::new();
        ranker
            .rerank(&pool, 3, Some(state), &mut rng(0), &mut out)
            .expect("reranks");
        let order = out.order.clone();
        ranker
            .rerank_summarized(
                &pool,
                &PoolSummary::of(&pool),
                3,
                Some(state),
                &mut rng(0),
                &mut out,
            )
            .expect("reranks");
        assert_eq!(out.order, order, "lambda {lambda:e}: summarized pass");
        order
    }

    /// The auditor's case: group 0 is more exposed per merit, so the controller puts the
    /// under-exposed group 1 first, for every accepted gain up to the maximum (1e308 used to
    /// make the boost NaN and give group 0 every slot).
    #[test]
    fn the_under_exposed_group_comes_first_for_every_accepted_gain_up_to_the_maximum() {
        let state = auditor_state(1.0, 1.0);
        for lambda in [
            1.0,
            1e3,
            MAX_LAMBDA / 2.0,
            MAX_LAMBDA.next_down(),
            MAX_LAMBDA,
        ] {
            assert_eq!(
                auditor_order(lambda, &state),
                [3, 4, 5],
                "lambda {lambda:e}"
            );
        }
        // And the boost saturates where the product overflows (gains above the maximum are
        // refused, but the arithmetic does not rely on that).
        assert_eq!(saturating_boost(1e308, 2.0, 1.0, 1.0), 0.0);
        assert_eq!(saturating_boost(1e308, 2.0, 1.0, 0.5), f64::MAX);
        assert_eq!(saturating_boost(2.0, 3.0, 1.0, 0.5), 3.0);
    }

    /// A merit so small that the group's exposure per merit overflows to infinity: that group
    /// is the most exposed, and the others get the largest boost (the controller used to
    /// switch off and leave the score order, the most exposed group first).
    #[test]
    fn an_infinite_exposure_per_merit_still_drives_the_controller() {
        let state = auditor_state(1.0, 1e-320);
        assert!((1.0 / 1e-320_f64).is_infinite());
        for lambda in [1e-4, 1.0, MAX_LAMBDA] {
            assert_eq!(
                auditor_order(lambda, &state),
                [3, 4, 5],
                "lambda {lambda:e}"
            );
        }
        // An astronomically large but finite gap, and every ranking a u64 can count.
        let mut state = auditor_state(1e300, 1e-8);
        state.rankings = u64::MAX;
        assert_eq!(auditor_order(MAX_LAMBDA, &state), [3, 4, 5]);
    }

    /// The item ids of `pool`'s ranking at `k` by `rerank`, checked against
    /// `rerank_summarized` and the reference pool pass (which must agree).
    fn ids_in_order(lambda: f64, pool: &[Candidate], k: usize, state: &AmortizedState) -> Vec<u32> {
        let ranker = FairCo::new(lambda).expect("an accepted gain");
        let mut out = RerankOutput::new();
        ranker
            .rerank(pool, k, Some(state), &mut rng(0), &mut out)
            .expect("reranks");
        let order = out.order.clone();
        ranker
            .rerank_summarized(
                pool,
                &PoolSummary::of(pool),
                k,
                Some(state),
                &mut rng(0),
                &mut out,
            )
            .expect("reranks");
        assert_eq!(out.order, order, "summarized pass");
        ranker
            .solve(pool, None, k, Some(state), &mut out, true)
            .expect("reranks");
        assert_eq!(out.order, order, "reference pass");
        order.iter().map(|&position| pool[position].id).collect()
    }

    /// Groups 0, 1 and 2 with two items each and, with `tiny`, group 3 with two items scored
    /// inside their range (so the pool's score scale is the same without it), in score order.
    fn near_zero_pool(tiny: bool) -> Vec<Candidate> {
        [
            (0, 0.9, 0),
            (1, 0.8, 0),
            (2, 0.7, 1),
            (3, 0.65, 3),
            (4, 0.6, 1),
            (5, 0.55, 3),
            (6, 0.5, 2),
            (7, 0.4, 2),
        ]
        .into_iter()
        .filter(|&(_, _, group)| tiny || group != 3)
        .map(|(id, score, group)| Candidate::new(id, score, group))
        .collect()
    }

    /// After two rankings, groups 0, 1 and 2 have exposure per merit 2, 1 and 0; with
    /// `tiny_merit`, group 3 has had exposure 0.3 for that merit.
    fn near_zero_state(tiny_merit: Option<f64>) -> AmortizedState {
        let mut state = AmortizedState::default();
        state.group_exposure.extend([(0, 1.0), (1, 0.5), (2, 0.0)]);
        state.group_relevance.extend([(0, 0.5), (1, 0.5), (2, 0.5)]);
        if let Some(merit) = tiny_merit {
            state.group_exposure.insert(3, 0.3);
            state.group_relevance.insert(3, merit);
        }
        state.rankings = 2;
        state
    }

    /// A group of tiny but positive merit that has had exposure is the most exposed per merit
    /// by far; the controller must go on controlling the other groups exactly as it would
    /// without it. Its ratio (0.3 / 1e-20 = 3e19) used to enter their corrections, which all
    /// rounded to the same value: they came out in score order, group 0 first. (1e-15 still
    /// worked; 1e-320 makes the ratio infinite, which failed the same way.)
    #[test]
    fn a_group_of_near_zero_merit_leaves_the_other_groups_under_control() {
        // Without group 3 the controller puts the least exposed group 2 first, against the
        // score order.
        let without = ids_in_order(1.0, &near_zero_pool(false), 8, &near_zero_state(None));
        assert_eq!(without, [6, 7, 2, 4, 0, 1]);
        for merit in [1e-15, 1e-20, 1e-30, 1e-300, 1e-320] {
            let state = near_zero_state(Some(merit));
            for k in [3, 6, 8] {
                let order = ids_in_order(1.0, &near_zero_pool(true), k, &state);
                let kept = k.min(6);
                assert_eq!(order[..kept], without[..kept], "merit {merit:e}, k {k}");
                // Group 3, the most exposed per merit, comes last.
                assert_eq!(order[kept..], [3, 5][..k - kept], "merit {merit:e}, k {k}");
            }
        }
    }

    /// `exposure_a / merit_a < exposure_b / merit_b` in exact arithmetic (positive merits,
    /// non-negative exposures): the cross products `exposure_a * merit_b` and
    /// `exposure_b * merit_a`, each as its rounded value and the exact remainder (a fused
    /// multiply-add), compared. The merits are first scaled by `2^200` (exact) so that no
    /// product or remainder underflows.
    fn exactly_less((exposure_a, merit_a): (f64, f64), (exposure_b, merit_b): (f64, f64)) -> bool {
        let product = |x: f64, merit: f64| {
            let y = merit * 2f64.powi(200);
            let rounded = x * y;
            (rounded, x.mul_add(y, -rounded))
        };
        let (left, right) = (product(exposure_a, merit_b), product(exposure_b, merit_a));
        left.0 < right.0 || (left.0 == right.0 && left.1 < right.1)
    }

    #[test]
    fn the_exact_ratio_comparison_sees_what_rounded_ratios_do_not() {
        // 1 / 3 and (1 + 2^-52) / (3 + 2^-50), a little less, round to the same f64 ratio.
        let (a, b) = ((1.0, 3.0), (1.0 + f64::EPSILON, 3.0 + 4.0 * f64::EPSILON));
        assert_eq!(a.0 / a.1, b.0 / b.1);
        assert!(exactly_less(b, a) && !exactly_less(a, b) && !exactly_less(a, a));
        // A subnormal merit: the ratio overflows, the comparison does not.
        let (tiny, huge): ((f64, f64), (f64, f64)) = ((1e-6, 1e-320), (1e-3, 1e-320));
        assert!((tiny.0 / tiny.1).is_infinite());
        assert!(exactly_less(tiny, huge) && !exactly_less(huge, tiny));
        assert!(exactly_less((0.0, 1.0), tiny) && !exactly_less((0.0, 1.0), (0.0, 0.5)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Random states with merits from 1e-30 to 1 (log-uniform, now and then one so small
        /// that the ratio overflows; some groups unexposed, some states repeated): every
        /// correction is finite and non-negative, and the groups' order by correction (tier
        /// first, larger boost first) never contradicts the exact order of their exposure per
        /// merit, and follows it strictly wherever the two ratios differ by a correction gap
        /// of at least `2^-16 W` (far above the keys' rounding) and by more than `2^-40` of
        /// themselves (so f64 tells them apart).
        #[test]
        fn corrections_are_finite_and_follow_the_exact_order_of_the_ratios(
            seed in proptest::prelude::any::<u64>(),
            groups in 1usize..24,
            lambda_exponent in -4.0f64..6.0,
            rankings in 1u64..1_000_000,
            scale_exponent in -3.0f64..3.0,
        ) {
            use rand::{Rng, SeedableRng};
            let mut generator = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut states: Vec<(f64, f64)> = (0..groups)
                .map(|_| {
                    let exposure = if generator.random_bool(0.2) {
                        0.0
                    } else {
                        10f64.powf(generator.random_range(-6.0..0.0))
                    };
                    let merit = if generator.random_bool(0.05) {
                        1e-320
                    } else {
                        10f64.powf(generator.random_range(-30.0..0.0))
                    };
                    (exposure, merit)
                })
                .collect();
            if groups > 2 && generator.random_bool(0.3) {
                states[2] = states[1];
            }
            let ratios: Vec<f64> =
                states.iter().map(|&(exposure, merit)| exposure / merit).collect();
            let mut best = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if generator.random_bool(0.3) {
                // The most exposed group of the state has no item in the pool.
                best = best.max(10f64.powf(generator.random_range(-6.0..30.0)));
            }
            let scale = if generator.random_bool(0.05) { 0.0 } else { 10f64.powf(scale_exponent) };
            let lambda = 10f64.powf(lambda_exponent).min(MAX_LAMBDA);
            let controller = Controller { lambda, past: rankings as f64, best, scale };
            let (mut boosts, mut tiers, mut sorted) = (Vec::new(), Vec::new(), Vec::new());
            controller.corrections(&ratios, &mut boosts, &mut tiers, &mut sorted);
            for &boost in &boosts {
                proptest::prop_assert!(boost.is_finite() && boost >= 0.0, "{boosts:?}");
            }
            let gain = lambda * rankings as f64;
            let threshold = scale * 2f64.powi(-16);
            for g in 0..groups {
                for h in 0..groups {
                    if !exactly_less(states[g], states[h]) {
                        continue;
                    }
                    let (first, second) = ((tiers[g], boosts[g]), (tiers[h], boosts[h]));
                    proptest::prop_assert!(
                        first.0 < second.0 || (first.0 == second.0 && first.1 >= second.1),
                        "group {g} {:?} before {h} {:?}: {first:?} vs {second:?}",
                        states[g], states[h]
                    );
                    let (low, high) = (ratios[g], ratios[h]);
                    let matters = high > low
                        && (high.is_infinite()
                            || (gain * (high - low) > threshold
                                && high - low > high * 2f64.powi(-40)));
                    if matters {
                        proptest::prop_assert!(
                            first.0 < second.0 || (first.0 == second.0 && first.1 > second.1),
                            "group {g} {:?} strictly before {h} {:?}: {first:?} vs {second:?}",
                            states[g], states[h]
                        );
                    }
                }
            }
        }

        /// Ordinary states (merits from 1e-3 to 1, typical gains) without a decisive gap get
        /// the paper's correction `lambda * (tau - 1) * (best - ratio)`, bit for bit, in one
        /// tier: the tiers change nothing where they are not needed.
        #[test]
        fn ordinary_states_get_the_papers_correction_bit_for_bit(
            states in proptest::collection::vec((0.0f64..1.0, 1e-3f64..1.0), 1..24),
            lambda in 1e-4f64..100.0,
            rankings in 1u64..10_000,
            scale in 0.5f64..4.0,
        ) {
            let ratios: Vec<f64> =
                states.iter().map(|&(exposure, merit)| exposure / merit).collect();
            let best = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let controller = Controller { lambda, past: rankings as f64, best, scale };
            let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
            proptest::prop_assume!(!controller.decisive(lowest, best));
            let (mut boosts, mut tiers, mut sorted) = (Vec::new(), Vec::new(), Vec::new());
            let count = controller.corrections(&ratios, &mut boosts, &mut tiers, &mut sorted);
            proptest::prop_assert_eq!(count, 1);
            for (boost, &ratio) in boosts.iter().zip(&ratios) {
                let paper = lambda * rankings as f64 * (best - ratio);
                proptest::prop_assert_eq!(boost.to_bits(), paper.to_bits());
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Groups of near-zero merit (1e-30 to 1e-18, each shown: exposure per merit above
        /// 1e15), beside ordinary ones (merit from 0.01 to 1): the ordinary groups' items are
        /// ranked exactly as for the same pool and state without the near-zero groups, and the
        /// near-zero groups' items follow them. Up to 26 groups (the merge and the selection
        /// path, labels below and above 64), near-zero groups sometimes without items in the
        /// pool, scores on a grid (ties), the ordinary groups holding the highest and lowest
        /// score (so the pool's score scale is the same without the others).
        #[test]
        fn groups_of_near_zero_merit_change_nothing_for_the_others(
            seed in proptest::prelude::any::<u64>(),
            ordinary in 1usize..24,
            tiny in 1usize..4,
            lambda_exponent in -4.0f64..6.0,
            rankings in 1u64..1_000_000,
            k_share in 0.0f64..=1.0,
        ) {
            use rand::seq::SliceRandom;
            use rand::{Rng, SeedableRng};
            let mut generator = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let lambda = 10f64.powf(lambda_exponent).min(MAX_LAMBDA);
            let mut labels: Vec<u32> = (0..(ordinary + tiny) as u32)
                .map(|label| if generator.random_bool(0.2) { 1_000 + label } else { label })
                .collect();
            labels.shuffle(&mut generator);
            let (ordinary_labels, tiny_labels) = labels.split_at(ordinary);
            let mut state = AmortizedState { rankings, ..AmortizedState::default() };
            for &label in ordinary_labels {
                let exposure = if generator.random_bool(0.25) {
                    0.0
                } else {
                    generator.random_range(0.0..1.0)
                };
                state.group_exposure.insert(label, exposure);
                state.group_relevance.insert(label, generator.random_range(0.01..1.0));
            }
            for &label in tiny_labels {
                state.group_exposure.insert(label, generator.random_range(1e-3..1.0));
                let merit = 10f64.powf(generator.random_range(-30.0..-18.0));
                state.group_relevance.insert(label, merit);
            }
            let mut items: Vec<(f32, u32)> = Vec::new();
            for &label in &labels {
                let least = usize::from(!tiny_labels.contains(&label));
                for _ in 0..generator.random_range(least..=4) {
                    items.push((f32::from(generator.random_range(1..1024u16)) / 1024.0, label));
                }
            }
            items.push((1.0, ordinary_labels[0]));
            items.push((0.0, ordinary_labels[ordinary - 1]));
            let mut pool: Vec<Candidate> = items
                .iter()
                .enumerate()
                .map(|(id, &(score, label))| Candidate::new(id as u32, score, label))
                .collect();
            pool.sort_by(|a, b| b.score.total_cmp(&a.score));
            let is_tiny = |label: u32| tiny_labels.contains(&label);
            let reduced_pool: Vec<Candidate> =
                pool.iter().copied().filter(|candidate| !is_tiny(candidate.group)).collect();
            let mut reduced_state = state.clone();
            for label in tiny_labels {
                reduced_state.group_exposure.remove(label);
                reduced_state.group_relevance.remove(label);
            }
            let k = (pool.len() as f64 * k_share).round() as usize;
            let kept = k.min(reduced_pool.len());
            let full = ids_in_order(lambda, &pool, k, &state);
            let reduced = ids_in_order(lambda, &reduced_pool, kept, &reduced_state);
            proptest::prop_assert_eq!(&full[..kept], &reduced[..]);
            proptest::prop_assert!(full[kept..].iter().all(|&id| is_tiny(items[id as usize].1)));
        }
    }

    #[test]
    fn lambda_above_the_maximum_is_refused_naming_it() {
        assert!(FairCo::new(MAX_LAMBDA).is_ok());
        for lambda in [MAX_LAMBDA.next_up(), 1e300, 1e308, f64::MAX] {
            let reason = FairCo::new(lambda).expect_err("refused");
            assert!(
                reason.contains("lambda") && reason.contains("1e6"),
                "{reason}"
            );
        }
        let registry = crate::Registry::with_builtins();
        let error = registry
            .build(&serde_json::json!({"name": "fairco", "lambda": 1e308}))
            .expect_err("refused");
        assert!(
            matches!(&error, FairnessError::InvalidParameter { parameter, .. } if parameter == "lambda"),
            "{error}"
        );
    }

    #[test]
    fn rejects_invalid_state_and_lambda() {
        assert!(FairCo::new(-1.0).is_err());
        assert!(FairCo::new(f64::NAN).is_err());
        let mut state = AmortizedState::default();
        state.group_relevance.insert(0, f64::INFINITY);
        let pool = vec![Candidate::new(0, 1.0, 0)];
        let result = FairCo::new(1.0).expect("valid").rerank(
            &pool,
            1,
            Some(&state),
            &mut rng(0),
            &mut RerankOutput::new(),
        );
        assert!(matches!(result, Err(FairnessError::InvalidState { .. })));
    }

    #[test]
    fn small_and_large_labels_each_form_one_group_with_the_pool_means() {
        // 24 labels, half of them above the direct-lookup range, interleaved.
        for distinct in [3u32, 24] {
            let pool: Vec<Candidate> = (0..200u32)
                .map(|i| {
                    let slot = (i * 7) % distinct;
                    let label = if slot % 2 == 0 { slot } else { 1_000 + slot };
                    Candidate::new(i, 2.0 - 0.01 * i as f32, label)
                })
                .collect();
            let ranker = FairCo::new(1.0).expect("valid");
            let mut out = RerankOutput::new();
            ranker
                .rerank(&pool, 10, None, &mut rng(0), &mut out)
                .expect("reranks");
            let state = out.state.clone().expect("amortized state");
            let mut expected: std::collections::BTreeMap<u32, (f64, f64)> = Default::default();
            for candidate in &pool {
                let entry = expected.entry(candidate.group).or_default();
                entry.0 += 1.0;
                entry.1 += f64::from(candidate.score).max(0.0);
            }
            assert_eq!(state.group_relevance.len(), expected.len());
            for (label, (size, sum)) in &expected {
                let mean = state.group_relevance[label];
                assert!((mean - sum / size).abs() < 1e-9, "label {label}");
            }
            let exposure: f64 = state
                .group_exposure
                .iter()
                .map(|(label, mean)| mean * expected[label].0)
                .sum();
            let weights: f64 = (1..=10).map(dcg_weight).sum();
            assert!((exposure - weights).abs() < 1e-9);
        }
    }

    /// A pool in score order with labels drawn from `labels` (few levels: many ties).
    fn random_pool(seed: u64, size: usize, labels: &[u32], levels: u32) -> Vec<Candidate> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut scores: Vec<f32> = (0..size)
            .map(|_| rng.random_range(0..levels) as f32 / levels as f32 * 4.0 - 1.0)
            .collect();
        if seed % 2 == 1 {
            // Scores over many magnitudes: the relevance sums round, so the order counts.
            for score in scores.iter_mut() {
                *score = (rng.random_range(-30.0f32..8.0)).exp() - 1e-6;
            }
        }
        scores.sort_by(|a, b| b.total_cmp(a));
        scores
            .into_iter()
            .enumerate()
            .map(|(index, score)| {
                let label = labels[rng.random_range(0..labels.len())];
                Candidate::new(index as u32, score, label)
            })
            .collect()
    }

    #[test]
    fn the_fast_pool_pass_equals_the_reference_bit_for_bit() {
        let label_sets: [&[u32]; 5] = [
            &[0],
            &[0, 1],
            &[3, 0, 1, 1, 1, 1],
            &[0, 1, 63, 64, 1_000],
            &[
                2, 5, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 62, 70,
            ],
        ];
        let mut exact = [0usize; 2];
        for seed in 0..120u64 {
            let labels = label_sets[seed as usize % label_sets.len()];
            let size = [0usize, 1, 7, 150, 2_000, 5_000][seed as usize % 6];
            let pool = random_pool(seed, size, labels, [3, 50, 1 << 20][seed as usize % 3]);
            exact[usize::from(sums_are_exact(&pool))] += 1;
            let ranker = FairCo::new(0.7).expect("valid");
            let summary = PoolSummary::of(&pool);
            let (mut fast, mut reference) = (RerankOutput::new(), RerankOutput::new());
            let mut summarized = RerankOutput::new();
            let (mut fast_state, mut reference_state) = (None, None);
            let mut summarized_state = None;
            for k in [0usize, 1, 10, 100] {
                ranker
                    .solve(&pool, None, k, fast_state.as_ref(), &mut fast, false)
                    .expect("reranks");
                ranker
                    .solve(
                        &pool,
                        None,
                        k,
                        reference_state.as_ref(),
                        &mut reference,
                        true,
                    )
                    .expect("reranks");
                ranker
                    .solve(
                        &pool,
                        Some(&summary),
                        k,
                        summarized_state.as_ref(),
                        &mut summarized,
                        false,
                    )
                    .expect("reranks");
                for output in [&fast, &summarized] {
                    assert_eq!(output.order, reference.order, "seed {seed} k {k}");
                    // Debug prints the shortest round-tripping form: equal text, equal bits.
                    assert_eq!(
                        format!("{:?}", output.state),
                        format!("{:?}", reference.state)
                    );
                    assert_eq!(
                        format!("{:?}", output.report),
                        format!("{:?}", reference.report)
                    );
                }
                fast_state = fast.state.clone();
                reference_state = reference.state.clone();
                summarized_state = summarized.state.clone();
            }
        }
        // Both the lane-split and the in-order summation were exercised.
        assert!(exact[0] > 10 && exact[1] > 10, "{exact:?}");
    }

    #[test]
    fn exact_sums_give_the_same_bits_in_every_order() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut checked = 0;
        for round in 0..400 {
            let size = rng.random_range(1..3_000);
            let scale = [1e-6f32, 1e-3, 1.0, 1e3, 1e6][round % 5];
            let mut pool: Vec<Candidate> = (0..size)
                .map(|index| {
                    let score = (rng.random::<f32>() - 0.2) * scale;
                    Candidate::new(index as u32, score, 0)
                })
                .collect();
            pool.sort_by(|a, b| b.score.total_cmp(&a.score));
            if !sums_are_exact(&pool) {
                continue;
            }
            checked += 1;
            let mut values: Vec<f64> = pool
                .iter()
                .map(|candidate| f64::from(candidate.score).max(0.0))
                .collect();
            let in_order = values.iter().fold(0.0f64, |sum, value| sum + value);
            values.shuffle(&mut rng);
            let shuffled = values.iter().fold(0.0f64, |sum, value| sum + value);
            let mut lanes = [0.0f64; 4];
            for (index, value) in values.iter().enumerate() {
                lanes[index % 4] += value;
            }
            let split = ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3];
            assert_eq!(in_order.to_bits(), shuffled.to_bits(), "round {round}");
            assert_eq!(in_order.to_bits(), split.to_bits(), "round {round}");
        }
        assert!(checked > 100, "{checked}");
        // A tiny positive score beside a large one: sums round, so the order must be kept.
        let pool = [Candidate::new(0, 1e6, 0), Candidate::new(1, 1e-30, 0)];
        assert!(!sums_are_exact(&pool));
        assert!(sums_are_exact(&[Candidate::new(0, -1.0, 0)]));
        assert!(sums_are_exact(&[]));
    }

    #[test]
    fn many_groups_use_the_selection_path_consistently() {
        let pool: Vec<Candidate> = (0..60)
            .map(|i| Candidate::new(i, 1.0 - 0.01 * i as f32, i % 30))
            .collect();
        let ranker = FairCo::new(10.0).expect("valid");
        let mut out = RerankOutput::new();
        let mut state = None;
        for _ in 0..5 {
            ranker
                .rerank(&pool, 10, state.as_ref(), &mut rng(0), &mut out)
                .expect("reranks");
            state = out.state.clone();
            let mut sorted = out.order.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 10);
        }
        // Groups never shown are boosted and eventually appear.
        let shown: std::collections::BTreeSet<u32> =
            out.order.iter().map(|&p| pool[p].group).collect();
        assert!(shown.iter().any(|&group| group >= 10), "{shown:?}");
    }
}
