//! `min-exposure`: every listed group receives at least a given share of the position-weighted
//! exposure of the top k, at the least utility loss found quickly, with a proven bound.
//!
//! Exposure of position `r` is `w_r = 1 / log2(1 + r)` (Singh & Joachims, KDD 2018); group
//! `g` must get `E_g >= share_g * W` with `W = sum_{r<=k} w_r`. Utility is
//! `U = sum_r w_r * score_r`. For a fixed assignment of positions to groups, the best items
//! are each group's top items in score order (rearrangement inequality), so a ranking is a
//! sequence of group labels.
//!
//! Method. Lagrangian relaxation: for multipliers `lambda_g >= 0`, ranking by boosted scores
//! `score + lambda_g` maximizes `U + sum_g lambda_g (E_g - T_g)` exactly (rearrangement), so
//! `D(lambda) = max_pi [U + sum_g lambda_g (E_g - T_g)]` is an upper bound on the utility of
//! every ranking meeting the targets `T_g = share_g W` (weak duality), and `D(0)` is the
//! unconstrained utility. The multipliers are searched in two phases: (1) the deficient groups
//! are raised together by the smallest common shift that satisfies all of them (a common shift
//! keeps their relative order, so they take positions only from other groups: unlisted ones,
//! and listed ones whose multiplier is 0, which is why phase 1 may need another round); (2) each
//! multiplier is lowered to the smallest value that still satisfies its own group (lowering one
//! only helps the others), repeated while that frees room. Each search is a bisection over the
//! multiplier that stops once a single ranking change separates the bracket ends. Adjacent
//! swaps that raise utility without breaking a target then polish the ranking. The report
//! gives the utility, the bound `min(D(0), D(lambda))` and the gap, which is at most
//! `sum_g lambda_g (E_g - T_g)`; with one constrained group the final multiplier is the dual
//! minimizer, so the bound is the best Lagrangian bound. When at most 4096 label sequences
//! exist (small k) an exhaustive branch-and-bound search returns the optimum instead (gap 0).

use crate::candidate::{Candidate, dcg_weight, validate_pool};
use crate::error::FairnessError;
use crate::groups::{GroupLists, GroupShares, dense_index};
use crate::reranker::{AmortizedState, Measure, Optimality, RerankOutput, Reranker, Violation};

/// Largest number of label sequences searched exhaustively (k <= 12 with two populated
/// groups, k <= 7 with three).
const EXACT_LIMIT: f64 = 4096.0;

/// Longest ranking searched exhaustively (bounds the recursion depth).
const MAX_EXACT_LENGTH: usize = 24;

/// Bisection steps per multiplier update (enough to resolve f32 score differences).
const BISECTION_STEPS: usize = 64;

/// Minimum exposure share per group with near-optimal utility.
#[derive(Debug, Clone)]
pub struct MinExposure {
    targets: GroupShares,
}

impl MinExposure {
    /// A re-ranker guaranteeing each listed group its exposure share when feasible.
    pub fn new(targets: GroupShares) -> Self {
        Self { targets }
    }

    /// The target exposure shares.
    pub fn targets(&self) -> &GroupShares {
        &self.targets
    }
}

/// Working state of one call.
struct Solver<'a, 'p> {
    pool: &'p [Candidate],
    lists: GroupLists<'p>,
    targets: &'a GroupShares,
    length: usize,
    /// Required exposure per listed group.
    required: &'a [f64],
    tolerance: f64,
    /// DCG weight of ranks 1..=length.
    weights: &'a [f64],
    /// Per group, the (score, pool position) of its items found so far, in score order.
    heads_cache: &'a mut Vec<Vec<(f64, usize)>>,
    /// Use the original merge (test oracle) instead of the fast one.
    #[cfg(test)]
    reference: bool,
}

/// Result of ranking by boosted scores.
struct Merged {
    utility: f64,
}

/// Reused buffers of the multiplier search.
struct Buffers<'b> {
    counts: &'b mut Vec<usize>,
    heads: &'b mut Vec<(f64, usize)>,
    order: &'b mut Vec<usize>,
    labels: &'b mut Vec<usize>,
    exposure: &'b mut Vec<f64>,
    low_labels: &'b mut Vec<usize>,
    high_labels: &'b mut Vec<usize>,
    /// The multipliers of the merge whose results the other buffers hold, while `holding`.
    held: &'b mut Vec<f64>,
    /// Whether the buffers still hold the results for `held` (a probe with the same
    /// multipliers would write exactly them; cleared when the search swaps labels out).
    holding: bool,
    /// A copy of the unconstrained merge's groups, counts and exposures (all multipliers
    /// `+0.0`), while `zero_kept`.
    zero_labels: &'b mut Vec<usize>,
    zero_counts: &'b mut Vec<usize>,
    zero_exposure: &'b mut Vec<f64>,
    zero_kept: bool,
}

impl Buffers<'_> {
    /// Whether the buffers hold the results of ranking with exactly `lambdas` (bit for bit).
    fn hold(&self, lambdas: &[f64]) -> bool {
        self.holding
            && self.held.len() == lambdas.len()
            && self
                .held
                .iter()
                .zip(lambdas)
                .all(|(held, lambda)| held.to_bits() == lambda.to_bits())
    }

    /// Keeps a copy of the results the buffers hold, which must be for all multipliers 0.
    fn keep_zero(&mut self) {
        self.zero_labels.clone_from(self.labels);
        self.zero_counts.clone_from(self.counts);
        self.zero_exposure.clone_from(self.exposure);
        self.zero_kept = true;
    }

    /// Restores the kept results of all multipliers 0 if `lambdas` are all `+0.0`.
    fn restore_zero(&mut self, lambdas: &[f64]) -> bool {
        if !self.zero_kept || lambdas.iter().any(|lambda| lambda.to_bits() != 0) {
            return false;
        }
        self.labels.clone_from(self.zero_labels);
        self.counts.clone_from(self.zero_counts);
        self.exposure.clone_from(self.zero_exposure);
        true
    }

    /// Records that the buffers now hold the results for `lambdas`.
    fn set_held(&mut self, lambdas: &[f64]) {
        self.held.clear();
        self.held.extend_from_slice(lambdas);
        self.holding = true;
    }
}

/// Whether two label sequences differ by exactly one event of a monotone boost: one adjacent
/// swap, or a different item at the last position. Then no breakpoint lies strictly between.
fn single_event(low: &[usize], high: &[usize]) -> bool {
    let mut differences = low
        .iter()
        .zip(high)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(index, _)| index);
    match (differences.next(), differences.next(), differences.next()) {
        (Some(only), None, None) => only + 1 == low.len(),
        (Some(first), Some(second), None) => {
            second == first + 1 && low[first] == high[second] && low[second] == high[first]
        }
        _ => false,
    }
}

impl Solver<'_, '_> {
    fn groups(&self) -> usize {
        self.targets.len() + 1
    }

    fn score(&self, position: usize) -> f64 {
        f64::from(self.pool[position].score)
    }

    /// The `index`-th (score, pool position) of `group`, scanning the pool lazily (the
    /// reference prefill of the test oracle).
    #[cfg(test)]
    fn item(&mut self, group: usize, index: usize) -> Option<(f64, usize)> {
        if let Some(&entry) = self
            .heads_cache
            .get(group)
            .and_then(|cache| cache.get(index))
        {
            return Some(entry);
        }
        let position = self.lists.get(group, index)?;
        let entry = (self.score(position), position);
        let cache = self.heads_cache.get_mut(group)?;
        if cache.len() == index {
            cache.push(entry);
        }
        Some(entry)
    }

    /// Fills each group's cache with its first `length` items (all a merge can use), so
    /// merges read plain slices: one scan of the pool that stops once every group has them.
    /// `reference` fills through the lazily scanned group lists instead (the test oracle).
    fn prefill(&mut self) {
        let groups = self.groups();
        #[cfg(test)]
        if self.reference {
            for group in 0..groups {
                let mut index = self.heads_cache.get(group).map_or(0, Vec::len);
                while index < self.length && self.item(group, index).is_some() {
                    index += 1;
                }
            }
            return;
        }
        let caches = &mut self.heads_cache[..groups];
        let mut open = caches
            .iter()
            .filter(|cache| cache.len() < self.length)
            .count();
        if open == 0 {
            return;
        }
        let labels = self.targets.labels();
        for (position, candidate) in self.pool.iter().enumerate() {
            let group = dense_index(labels, candidate.group);
            let Some(cache) = caches.get_mut(group) else {
                continue;
            };
            if cache.len() < self.length {
                cache.push((f64::from(candidate.score), position));
                if cache.len() == self.length {
                    open -= 1;
                    if open == 0 {
                        break;
                    }
                }
            }
        }
    }

    /// The `index`-th (score, pool position) of `group` from the prefilled cache.
    #[inline]
    fn cached(&self, group: usize, index: usize) -> Option<(f64, usize)> {
        self.heads_cache.get(group)?.get(index).copied()
    }

    /// Ranks by `score + lambda[group]` (ties: pool position), writing positions, per-group
    /// exposures and per-position groups; `heads` caches each group's next boosted item.
    ///
    /// Reads the prefilled per-group slices directly (a two-pointer merge with two groups);
    /// bit for bit the same as `Solver::merge_reference`, the original formulation kept as
    /// the test oracle (`reference` set; compiled for tests only).
    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        lambdas: &[f64],
        counts: &mut Vec<usize>,
        heads: &mut Vec<(f64, usize)>,
        order: &mut Vec<usize>,
        labels: &mut Vec<usize>,
        exposure: &mut Vec<f64>,
    ) -> Merged {
        #[cfg(test)]
        if self.reference {
            return self.merge_reference(lambdas, counts, heads, order, labels, exposure);
        }
        self.merge_fast::<true>(lambdas, counts, heads, order, labels, exposure)
    }

    /// [`Solver::merge`] for the multiplier search: the same per-position groups, counts and
    /// exposures, but no utility and no positions (`order` is left empty).
    ///
    /// Skips the merge when the buffers already hold its results, and copies those of all
    /// multipliers 0 (the unconstrained merge) when asked for them again: the multiplier
    /// search probes some multipliers several times (0 at the start of each bisection from
    /// 0, and the ones phase 1 ends on, which phase 2 starts from). The reference solver
    /// (test oracle) always merges.
    fn probe(&mut self, lambdas: &[f64], buffers: &mut Buffers<'_>) {
        #[cfg(test)]
        if self.reference {
            self.merge_into(lambdas, buffers);
            return;
        }
        if buffers.hold(lambdas) {
            return;
        }
        buffers.set_held(lambdas);
        if buffers.restore_zero(lambdas) {
            return;
        }
        self.merge_fast::<false>(
            lambdas,
            buffers.counts,
            buffers.heads,
            buffers.order,
            buffers.labels,
            buffers.exposure,
        );
    }

    /// The merge; `FULL` also sums the utility and writes the positions (`order`), which
    /// the multiplier search never reads (it is left empty otherwise).
    #[allow(clippy::too_many_arguments)]
    fn merge_fast<const FULL: bool>(
        &self,
        lambdas: &[f64],
        counts: &mut Vec<usize>,
        heads: &mut Vec<(f64, usize)>,
        order: &mut Vec<usize>,
        labels: &mut Vec<usize>,
        exposure: &mut Vec<f64>,
    ) -> Merged {
        let groups = self.groups();
        counts.clear();
        counts.resize(groups, 0);
        exposure.clear();
        exposure.resize(groups, 0.0);
        let cache = &self.heads_cache[..groups];
        let weights = &self.weights[..self.length];
        let mut utility = 0.0;
        if let ([first, second], [lambda_first, lambda_second, ..]) = (cache, lambdas) {
            let (lambda_first, lambda_second) = (*lambda_first, *lambda_second);
            let (mut rest_first, mut rest_second) = (first.iter(), second.iter());
            let (mut head_first, mut head_second) = (rest_first.next(), rest_second.next());
            let (mut exposure_first, mut exposure_second) = (0.0, 0.0);
            let (mut taken_first, mut taken_second) = (0usize, 0usize);
            order.clear();
            labels.clear();
            if FULL {
                order.resize(self.length, 0);
            }
            labels.resize(self.length, 0);
            let mut filled = 0;
            for (&weight, label) in weights.iter().zip(labels.iter_mut()) {
                // The second group wins only when strictly better (ties: earlier position).
                let (second_wins, &(score, position)) = match (head_first, head_second) {
                    (Some(a), Some(b)) => {
                        let boosted_a = a.0 + lambda_first;
                        let boosted_b = b.0 + lambda_second;
                        if boosted_b > boosted_a || (boosted_b == boosted_a && b.1 < a.1) {
                            (true, b)
                        } else {
                            (false, a)
                        }
                    }
                    (Some(a), None) => (false, a),
                    (None, Some(b)) => (true, b),
                    (None, None) => break,
                };
                if second_wins {
                    head_second = rest_second.next();
                    taken_second += 1;
                    exposure_second += weight;
                    if FULL {
                        utility += weight * ((score + lambda_second) - lambda_second);
                    }
                    *label = 1;
                } else {
                    head_first = rest_first.next();
                    taken_first += 1;
                    exposure_first += weight;
                    if FULL {
                        utility += weight * ((score + lambda_first) - lambda_first);
                    }
                    *label = 0;
                }
                if FULL && let Some(slot) = order.get_mut(filled) {
                    *slot = position;
                }
                filled += 1;
            }
            order.truncate(filled);
            labels.truncate(filled);
            counts[0] = taken_first;
            counts[1] = taken_second;
            exposure[0] = exposure_first;
            exposure[1] = exposure_second;
            return Merged { utility };
        }
        order.clear();
        labels.clear();
        order.reserve(self.length);
        labels.reserve(self.length);
        heads.clear();
        heads.extend(
            cache
                .iter()
                .zip(lambdas)
                .map(|(items, &lambda)| match items.first() {
                    Some(&(score, position)) => (score + lambda, position),
                    None => (f64::NEG_INFINITY, usize::MAX),
                }),
        );
        for &weight in weights {
            // An exhausted group's head (-inf, usize::MAX) never beats a real one.
            let mut best = 0;
            let (mut best_boosted, mut best_position) = heads[0];
            for (group, &(boosted, position)) in heads.iter().enumerate().skip(1) {
                if boosted > best_boosted || (boosted == best_boosted && position < best_position) {
                    best = group;
                    best_boosted = boosted;
                    best_position = position;
                }
            }
            if best_position == usize::MAX {
                break;
            }
            counts[best] += 1;
            exposure[best] += weight;
            if FULL {
                utility += weight * (best_boosted - lambdas[best]);
            }
            if FULL {
                order.push(best_position);
            }
            labels.push(best);
            heads[best] = match cache[best].get(counts[best]) {
                Some(&(score, next)) => (score + lambdas[best], next),
                None => (f64::NEG_INFINITY, usize::MAX),
            };
        }
        Merged { utility }
    }

    /// The original merge over the lazily read per-group heads (the test oracle of
    /// [`Solver::merge`]).
    #[cfg(test)]
    #[allow(clippy::too_many_arguments)]
    fn merge_reference(
        &mut self,
        lambdas: &[f64],
        counts: &mut Vec<usize>,
        heads: &mut Vec<(f64, usize)>,
        order: &mut Vec<usize>,
        labels: &mut Vec<usize>,
        exposure: &mut Vec<f64>,
    ) -> Merged {
        let groups = self.groups();
        counts.clear();
        counts.resize(groups, 0);
        exposure.clear();
        exposure.resize(groups, 0.0);
        order.clear();
        labels.clear();
        heads.clear();
        for (group, &lambda) in lambdas.iter().enumerate().take(groups) {
            heads.push(match self.cached(group, 0) {
                Some((score, position)) => (score + lambda, position),
                None => (f64::NEG_INFINITY, usize::MAX),
            });
        }
        let mut utility = 0.0;
        for rank in 1..=self.length {
            // (boosted score, pool position, group) of the best head.
            let mut best: Option<(f64, usize, usize)> = None;
            for (group, &(boosted, position)) in heads.iter().enumerate() {
                if position == usize::MAX {
                    continue;
                }
                if best.is_none_or(|(best_boosted, best_position, _)| {
                    boosted > best_boosted || (boosted == best_boosted && position < best_position)
                }) {
                    best = Some((boosted, position, group));
                }
            }
            let Some((boosted, position, best)) = best else {
                break;
            };
            let weight = self.weights[rank - 1];
            counts[best] += 1;
            exposure[best] += weight;
            utility += weight * (boosted - lambdas[best]);
            order.push(position);
            labels.push(best);
            heads[best] = match self.cached(best, counts[best]) {
                Some((score, next)) => (score + lambdas[best], next),
                None => (f64::NEG_INFINITY, usize::MAX),
            };
        }
        Merged { utility }
    }

    /// [`Solver::merge`] into `buffers` (the reference probe of the test oracle).
    #[cfg(test)]
    fn merge_into(&mut self, lambdas: &[f64], buffers: &mut Buffers<'_>) -> Merged {
        self.merge(
            lambdas,
            buffers.counts,
            buffers.heads,
            buffers.order,
            buffers.labels,
            buffers.exposure,
        )
    }

    /// The smallest value `v` in `(low, high]` for which ranking with `set(lambdas, v)` meets
    /// `accept` (monotone: false below some breakpoint, true from it on), or `None` when even
    /// `high` fails. Stops at `resolution` or as soon as only one ranking change separates the
    /// bracket ends. Leaves `lambdas` modified; the caller sets the returned value.
    #[allow(clippy::too_many_arguments)]
    fn bisect(
        &mut self,
        lambdas: &mut [f64],
        buffers: &mut Buffers<'_>,
        mut low: f64,
        mut high: f64,
        resolution: f64,
        set: impl Fn(&mut [f64], f64),
        accept: impl Fn(&Solver<'_, '_>, &[f64]) -> bool,
    ) -> Option<f64> {
        set(lambdas, high);
        self.probe(lambdas, buffers);
        if !accept(self, buffers.exposure) {
            return None;
        }
        std::mem::swap(buffers.high_labels, buffers.labels);
        buffers.holding = false;
        set(lambdas, low);
        self.probe(lambdas, buffers);
        if accept(self, buffers.exposure) {
            return Some(low);
        }
        std::mem::swap(buffers.low_labels, buffers.labels);
        buffers.holding = false;
        for _ in 0..BISECTION_STEPS {
            let middle = 0.5 * (low + high);
            if high - low <= resolution
                || !(middle > low && middle < high)
                || single_event(buffers.low_labels, buffers.high_labels)
            {
                break;
            }
            set(lambdas, middle);
            self.probe(lambdas, buffers);
            if accept(self, buffers.exposure) {
                high = middle;
                std::mem::swap(buffers.high_labels, buffers.labels);
                buffers.holding = false;
            } else {
                low = middle;
                std::mem::swap(buffers.low_labels, buffers.labels);
                buffers.holding = false;
            }
        }
        Some(high)
    }

    fn deficit(&self, exposure: &[f64], group: usize) -> f64 {
        self.required[group] - exposure[group]
    }

    fn satisfied(&self, exposure: &[f64]) -> bool {
        (0..self.targets.len()).all(|group| self.deficit(exposure, group) <= self.tolerance)
    }

    /// Exhaustive branch and bound over label sequences; `None` if nothing is feasible.
    fn exact(&mut self, counts: &mut Vec<usize>, best_labels: &mut Vec<usize>) -> Option<f64> {
        let groups = self.groups();
        counts.clear();
        counts.resize(groups, 0);
        let mut exposure = vec![0.0; groups];
        let mut current = Vec::with_capacity(self.length);
        let mut best = None;
        self.search(
            0,
            0.0,
            counts,
            &mut exposure,
            &mut current,
            &mut best,
            best_labels,
        );
        best
    }

    #[allow(clippy::too_many_arguments)]
    fn search(
        &mut self,
        filled: usize,
        utility: f64,
        counts: &mut Vec<usize>,
        exposure: &mut Vec<f64>,
        current: &mut Vec<usize>,
        best: &mut Option<f64>,
        best_labels: &mut Vec<usize>,
    ) {
        let groups = self.groups();
        if filled == self.length {
            if self.satisfied(exposure) && best.is_none_or(|value| utility > value) {
                *best = Some(utility);
                best_labels.clear();
                best_labels.extend_from_slice(current);
            }
            return;
        }
        // Feasibility bound: each listed group can at most take the next free positions.
        for group in 0..self.targets.len() {
            let mut available = 0usize;
            while available < self.length - filled
                && self.lists.get(group, counts[group] + available).is_some()
            {
                available += 1;
            }
            let reachable: f64 = (filled + 1..=filled + available).map(dcg_weight).sum();
            if exposure[group] + reachable < self.required[group] - self.tolerance {
                return;
            }
        }
        // Utility bound: the remaining positions filled in unconstrained score order.
        if let Some(value) = *best {
            let mut taken = counts.clone();
            let mut bound = utility;
            for rank in filled + 1..=self.length {
                let mut next: Option<(usize, usize)> = None;
                for (group, &count) in taken.iter().enumerate() {
                    if let Some(position) = self.lists.get(group, count)
                        && next.is_none_or(|(_, best_position)| position < best_position)
                    {
                        next = Some((group, position));
                    }
                }
                let Some((group, position)) = next else { break };
                taken[group] += 1;
                bound += dcg_weight(rank) * self.score(position);
            }
            if bound <= value {
                return;
            }
        }
        // Branch on groups, best next item first.
        let mut options: Vec<(usize, usize)> = (0..groups)
            .filter_map(|group| {
                self.lists
                    .get(group, counts[group])
                    .map(|position| (position, group))
            })
            .collect();
        options.sort_unstable();
        let weight = dcg_weight(filled + 1);
        for (position, group) in options {
            counts[group] += 1;
            exposure[group] += weight;
            current.push(group);
            let gain = weight * self.score(position);
            self.search(
                filled + 1,
                utility + gain,
                counts,
                exposure,
                current,
                best,
                best_labels,
            );
            current.pop();
            exposure[group] -= weight;
            counts[group] -= 1;
        }
    }
}

/// Exposure shares of the listed groups in `order` and the first one below its target.
pub fn check_min_exposure(
    pool: &[Candidate],
    order: &[usize],
    targets: &GroupShares,
) -> Option<Violation> {
    let total: f64 = (1..=order.len()).map(dcg_weight).sum();
    if total <= 0.0 {
        return None;
    }
    let mut exposure = vec![0.0; targets.len() + 1];
    for (index, &position) in order.iter().enumerate() {
        if let Some(candidate) = pool.get(position) {
            exposure[targets.dense(candidate.group)] += dcg_weight(index + 1);
        }
    }
    for (dense, (label, share)) in targets.pairs().enumerate() {
        let actual = exposure[dense] / total;
        if actual < share - 1e-9 {
            return Some(Violation {
                prefix: order.len(),
                group: label,
                required: share,
                actual,
                measure: Measure::ExposureShare,
            });
        }
    }
    None
}

impl Reranker for MinExposure {
    fn name(&self) -> &str {
        "min-exposure"
    }

    fn violation(
        &self,
        pool: &[Candidate],
        order: &[usize],
    ) -> Result<Option<Violation>, FairnessError> {
        Ok(check_min_exposure(pool, order, &self.targets))
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name(), "targets": self.targets.to_json() })
    }

    fn rerank(
        &self,
        pool: &[Candidate],
        k: usize,
        _state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        self.solve(pool, k, out, false)
    }
}

impl MinExposure {
    /// The re-ranking; `reference` selects the original merge (the test oracle).
    fn solve(
        &self,
        pool: &[Candidate],
        k: usize,
        out: &mut RerankOutput,
        #[cfg_attr(not(test), allow(unused_variables))] reference: bool,
    ) -> Result<(), FairnessError> {
        out.reset();
        out.state = None;
        validate_pool(pool)?;
        let length = k.min(pool.len());
        if length == 0 {
            out.report.optimality = Some(Optimality {
                utility: 0.0,
                upper_bound: 0.0,
                gap: 0.0,
                exact: true,
            });
            return Ok(());
        }
        let RerankOutput {
            order,
            report,
            scratch,
            ..
        } = out;
        let total_weight: f64 = (1..=length).map(dcg_weight).sum();
        let listed = self.targets.len();
        let groups = listed + 1;
        let required = &mut scratch.required;
        required.clear();
        required.extend(self.targets.pairs().map(|(_, share)| share * total_weight));
        required.push(0.0);
        let weights = &mut scratch.weights;
        weights.clear();
        weights.extend((1..=length).map(dcg_weight));
        let heads_cache = &mut scratch.group_items;
        if heads_cache.len() < groups {
            heads_cache.resize_with(groups, Vec::new);
        }
        for cache in heads_cache.iter_mut() {
            cache.clear();
        }
        let mut solver = Solver {
            pool,
            lists: GroupLists::new(pool, self.targets.labels(), &mut scratch.lists).with_probing(),
            targets: &self.targets,
            length,
            required,
            tolerance: 1e-12 * total_weight,
            weights,
            heads_cache,
            #[cfg(test)]
            reference,
        };
        solver.prefill();
        let counts = &mut scratch.counts;
        let labels = &mut scratch.positions2;
        let lambdas = &mut scratch.values;
        let exposure = &mut scratch.values2;
        lambdas.clear();
        lambdas.resize(groups, 0.0);
        let heads = &mut scratch.heap;
        let unconstrained = solver
            .merge(lambdas, counts, heads, order, labels, exposure)
            .utility;
        if solver.satisfied(exposure) {
            report.optimality = Some(Optimality {
                utility: unconstrained,
                upper_bound: unconstrained,
                gap: 0.0,
                exact: true,
            });
            return Ok(());
        }

        // Small instances: exhaustive search.
        // A group is in the pool iff its prefilled cache is not empty (`length` >= 1).
        let populated = (0..groups)
            .filter(|&group| solver.cached(group, 0).is_some())
            .count();
        let searched =
            length <= MAX_EXACT_LENGTH && (populated as f64).powi(length as i32) <= EXACT_LIMIT;
        if searched {
            let best_labels = &mut scratch.positions;
            if let Some(utility) = solver.exact(counts, best_labels) {
                counts.clear();
                counts.resize(groups, 0);
                order.clear();
                for &group in best_labels.iter() {
                    if let Some(position) = solver.lists.get(group, counts[group]) {
                        order.push(position);
                        counts[group] += 1;
                    }
                }
                report.optimality = Some(Optimality {
                    utility,
                    upper_bound: utility,
                    gap: 0.0,
                    exact: true,
                });
                return Ok(());
            }
        }

        // Lagrangian multipliers. Phase 1: raise the deficient (and already boosted) groups
        // together by the smallest common shift that satisfies all of them; a common shift
        // keeps their relative order, so they only take positions from other groups.
        let span = f64::from(pool[0].score) - f64::from(pool[pool.len() - 1].score);
        // Multipliers closer than this cannot change the order except between near-ties.
        let resolution = 1e-9 * (1.0 + span);
        let base = &mut scratch.values3;
        let mut buffers = Buffers {
            counts,
            heads,
            order,
            labels,
            exposure,
            low_labels: &mut scratch.consumed,
            high_labels: &mut scratch.deadlines,
            held: &mut scratch.held,
            holding: false,
            zero_labels: &mut scratch.zero_labels,
            zero_counts: &mut scratch.zero_counts,
            zero_exposure: &mut scratch.zero_exposure,
            zero_kept: false,
        };
        // The buffers hold the unconstrained merge (all multipliers 0), unless the
        // exhaustive search above reused them.
        if !searched {
            buffers.set_held(lambdas);
            buffers.keep_zero();
        }
        for _round in 0..listed + 2 {
            solver.probe(lambdas, &mut buffers);
            if solver.satisfied(buffers.exposure) {
                break;
            }
            let active = &mut scratch.counts2;
            active.clear();
            active.extend((0..listed).filter(|&group| {
                lambdas[group] > 0.0 || solver.deficit(buffers.exposure, group) > solver.tolerance
            }));
            base.clear();
            base.extend_from_slice(lambdas);
            let ceiling = lambdas.iter().copied().fold(0.0, f64::max);
            let shift = |lambdas: &mut [f64], amount: f64| {
                for &group in active.iter() {
                    lambdas[group] = base[group] + amount;
                }
            };
            let all_active = |solver: &Solver<'_, '_>, exposure: &[f64]| {
                active
                    .iter()
                    .all(|&group| solver.deficit(exposure, group) <= solver.tolerance)
            };
            let search = solver.bisect(
                lambdas,
                &mut buffers,
                0.0,
                span + ceiling + 1.0,
                resolution,
                shift,
                all_active,
            );
            match search {
                Some(amount) => shift(lambdas, amount),
                None => {
                    // The constrained groups compete among themselves: keep the maximal effort.
                    shift(lambdas, span + ceiling + 1.0);
                    break;
                }
            }
        }
        // Phase 2: lower each multiplier to the smallest value that keeps its own group
        // satisfied (lowering one only helps the others), recovering utility; repeat while
        // that frees noticeable room.
        solver.probe(lambdas, &mut buffers);
        let mut passes = if solver.satisfied(buffers.exposure) {
            3
        } else {
            0
        };
        while passes > 0 {
            passes -= 1;
            let mut lowered = false;
            for group in 0..listed {
                let previous = lambdas[group];
                if previous <= 0.0 {
                    continue;
                }
                let set = |lambdas: &mut [f64], value: f64| lambdas[group] = value;
                let own = |solver: &Solver<'_, '_>, exposure: &[f64]| {
                    solver.deficit(exposure, group) <= solver.tolerance
                };
                let value = solver
                    .bisect(lambdas, &mut buffers, 0.0, previous, resolution, set, own)
                    .unwrap_or(previous);
                lambdas[group] = value;
                lowered |= value < 0.99 * previous;
            }
            if !lowered {
                break;
            }
        }
        let Buffers {
            counts,
            heads,
            order,
            labels,
            exposure,
            ..
        } = buffers;
        let merged = solver.merge(lambdas, counts, heads, order, labels, exposure);
        let dual: f64 = merged.utility
            + (0..listed)
                .map(|group| lambdas[group] * (exposure[group] - solver.required[group]))
                .sum::<f64>();
        let upper_bound = unconstrained.min(dual);
        let mut utility = merged.utility;

        // Polish: swap adjacent inversions between groups while every target still holds.
        let feasible = solver.satisfied(exposure);
        if feasible {
            for _pass in 0..length {
                let mut improved = false;
                for index in 0..length.saturating_sub(1) {
                    let (upper, lower) = (order[index], order[index + 1]);
                    let (upper_group, lower_group) = (labels[index], labels[index + 1]);
                    if upper_group == lower_group || pool[upper].score >= pool[lower].score {
                        continue;
                    }
                    let moved = dcg_weight(index + 1) - dcg_weight(index + 2);
                    if upper_group < listed
                        && exposure[upper_group] - moved
                            < solver.required[upper_group] - solver.tolerance
                    {
                        continue;
                    }
                    order.swap(index, index + 1);
                    labels.swap(index, index + 1);
                    exposure[upper_group] -= moved;
                    exposure[lower_group] += moved;
                    utility +=
                        moved * (f64::from(pool[lower].score) - f64::from(pool[upper].score));
                    improved = true;
                }
                if !improved {
                    break;
                }
            }
        }
        report.optimality = Some(Optimality {
            utility,
            upper_bound: upper_bound.max(utility),
            gap: (upper_bound - utility).max(0.0),
            exact: false,
        });
        if let Some(violation) = check_min_exposure(pool, order, &self.targets) {
            report.satisfied = false;
            report.fallback = true;
            report.violation = Some(violation);
            report.notes.push(format!(
                "group {} cannot reach exposure share {:.4} together with the other targets; best effort gives {:.4}",
                violation.group, violation.required, violation.actual
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// A pool of `size` items in score order: scores from `levels` distinct values (few
    /// levels give many ties), groups `0..groups` with group 1 rarer.
    fn pool(seed: u64, size: usize, groups: u32, levels: u32) -> Vec<Candidate> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut scores: Vec<f32> = (0..size)
            .map(|_| rng.random_range(0..levels) as f32 / levels as f32 * 3.0 - 1.0)
            .collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        scores
            .into_iter()
            .enumerate()
            .map(|(index, score)| {
                let group = if rng.random_bool(0.25) {
                    1
                } else {
                    rng.random_range(0..groups)
                };
                Candidate::new(index as u32, score, group.min(groups - 1))
            })
            .collect()
    }

    /// Runs the fast and the reference solver and checks they agree bit for bit.
    fn same_as_reference(pool: &[Candidate], k: usize, pairs: &[(u32, f64)]) {
        let Ok(targets) = GroupShares::new(pairs) else {
            return;
        };
        let reranker = MinExposure::new(targets);
        let mut fast = RerankOutput::new();
        let mut reference = RerankOutput::new();
        let fast_result = reranker.solve(pool, k, &mut fast, false);
        let reference_result = reranker.solve(pool, k, &mut reference, true);
        assert_eq!(format!("{fast_result:?}"), format!("{reference_result:?}"));
        assert_eq!(fast.order, reference.order, "k {k}, targets {pairs:?}");
        // Debug prints the shortest round-tripping form: equal text means equal bits.
        assert_eq!(
            format!("{:?}", fast.report),
            format!("{:?}", reference.report),
            "k {k}, targets {pairs:?}"
        );
    }

    #[test]
    fn the_fast_merge_equals_the_reference_on_a_bench_sized_pool() {
        for seed in 0..4 {
            let pool = pool(seed, 10_000, 2, 1 << 20);
            same_as_reference(&pool, 100, &[(1, 0.4)]);
            let pool = pool_three(seed);
            same_as_reference(&pool, 100, &[(1, 0.4), (2, 0.3)]);
        }
    }

    fn pool_three(seed: u64) -> Vec<Candidate> {
        pool(seed, 3_000, 3, 1 << 20)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn the_fast_merge_equals_the_reference(
            seed in 0u64..1_000_000,
            size in 1usize..400,
            groups in 1u32..5,
            levels in prop::sample::select(vec![3u32, 20, 1 << 20]),
            k in 1usize..150,
            first in 0.0f64..0.8,
            second in 0.0f64..0.5,
            two_listed in any::<bool>(),
        ) {
            let pool = pool(seed, size, groups, levels);
            if two_listed {
                same_as_reference(&pool, k, &[(1, first * 0.6), (2, second * 0.6)]);
            } else {
                same_as_reference(&pool, k, &[(1, first)]);
            }
        }
    }
}
