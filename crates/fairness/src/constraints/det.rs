//! `det-greedy`, `det-cons`, `det-relaxed` and `det-const-sort` (Geyik, Ambler, Kenthapadi,
//! KDD 2019, Algorithms 1-3), with minimum representation guaranteed at every prefix.
//!
//! Each group `a` has a target share `p_a`; unlisted labels form one rest group with share
//! `1 - sum p_a`. The minimum representation constraint is `count_a(t) >= floor(t p_a)` for
//! every prefix `t`, capped by the number of items of `a` in the pool ("whenever enough
//! items of that group exist").
//!
//! Algorithm 1 (DetGreedy / DetCons / DetRelaxed) fills position `t` from `belowMin =
//! {a : count_a < floor(t p_a)}` by best next score if non-empty, otherwise from `belowMax =
//! {a : floor(t p_a) <= count_a < ceil(t p_a)}`: DetGreedy by best next score, DetCons by
//! smallest `ceil(t p_a) / p_a`, DetRelaxed by best next score among the groups minimizing
//! `ceil(ceil(t p_a) / p_a)`. With three or more groups these rules can paint themselves into a
//! corner (two minimums due at once). Ours adds a feasibility guard: the j-th item of group `a`
//! has deadline `ceil(j / p_a)`, and these unit jobs are schedulable iff for every prefix the
//! number of deadlines at or before it does not exceed it (earliest-deadline-first is optimal).
//! The paper's choice `x` keeps the schedule feasible iff no prefix before x's next deadline
//! is tight; otherwise the guard takes the earliest-deadline group instead. The guard never
//! fires when the paper's choice is safe, so outputs coincide with the paper whenever the paper
//! succeeds.
//!
//! Algorithm 3 (DetConstSort) inserts an item whenever its group's minimum count increases,
//! records the prefix length at which it became required (its max index) and bubbles it up
//! past lower-scored items that can move down. Third-party ports of the pseudo-code with 0-based
//! lists (AIF360's `DeterministicReranking` among them) test `maxIndices[start-1] >= start`,
//! which lets the displaced item slip one
//! position past its max index; ours requires its new 1-based position `start + 1` to be at
//! most its max index, so every minimum holds at every prefix.

use crate::candidate::{Candidate, ceil_share, floor_share, share_deadline, validate_pool};
use crate::error::FairnessError;
use crate::groups::{GroupLists, GroupShares, dense_index, group_totals};
use crate::reranker::{AmortizedState, Measure, RerankOutput, RerankReport, Reranker, Violation};
use crate::summary::PoolSummary;

/// The selection rule of Algorithm 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetVariant {
    /// DetGreedy: best next score among groups below their maximum.
    Greedy,
    /// DetCons: the group whose next minimum comes soonest, `argmin ceil(t p) / p`.
    Cons,
    /// DetRelaxed: best next score among groups minimizing `ceil(ceil(t p) / p)`.
    Relaxed,
}

impl DetVariant {
    /// The registry name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Greedy => "det-greedy",
            Self::Cons => "det-cons",
            Self::Relaxed => "det-relaxed",
        }
    }
}

/// DetGreedy, DetCons or DetRelaxed with the feasibility guard.
#[derive(Debug, Clone)]
pub struct DetRanker {
    variant: DetVariant,
    targets: GroupShares,
    guard: bool,
}

impl DetRanker {
    /// A re-ranker with the given rule and target shares.
    pub fn new(variant: DetVariant, targets: GroupShares) -> Self {
        Self {
            variant,
            targets,
            guard: true,
        }
    }

    /// The target shares.
    pub fn targets(&self) -> &GroupShares {
        &self.targets
    }

    /// The algorithm exactly as published, without the feasibility guard (for comparisons).
    pub fn without_guard(mut self) -> Self {
        self.guard = false;
        self
    }
}

/// DetConstSort with the corrected max-index test.
#[derive(Debug, Clone)]
pub struct DetConstSort {
    targets: GroupShares,
    paper_swap_test: bool,
}

impl DetConstSort {
    /// A re-ranker with the given target shares.
    pub fn new(targets: GroupShares) -> Self {
        Self {
            targets,
            paper_swap_test: false,
        }
    }

    /// The target shares.
    pub fn targets(&self) -> &GroupShares {
        &self.targets
    }

    /// Uses the published test `maxIndices[start-1] >= start` (lets items slip past their max
    /// index; for comparisons only).
    pub fn with_paper_swap_test(mut self) -> Self {
        self.paper_swap_test = true;
        self
    }
}

/// The first prefix of `order` where a listed group has fewer than `floor(t * share)` items,
/// ignoring availability (so a violation means the pool is short of that group).
pub fn check_min_counts(
    pool: &[Candidate],
    order: &[usize],
    targets: &GroupShares,
) -> Option<Violation> {
    let mut counts = vec![0usize; targets.len() + 1];
    first_count_violation(pool, order, targets, &mut counts)
}

fn first_count_violation(
    pool: &[Candidate],
    order: &[usize],
    targets: &GroupShares,
    counts: &mut Vec<usize>,
) -> Option<Violation> {
    counts.clear();
    counts.resize(targets.len() + 1, 0);
    for (index, &position) in order.iter().enumerate() {
        if let Some(candidate) = pool.get(position) {
            counts[dense_index(targets.labels(), candidate.group)] += 1;
        }
        let prefix = index + 1;
        for (dense, (label, share)) in targets.pairs().enumerate() {
            let required = floor_share(prefix, share);
            if counts[dense] < required {
                return Some(Violation {
                    prefix,
                    group: label,
                    required: required as f64,
                    actual: counts[dense] as f64,
                    measure: Measure::Count,
                });
            }
        }
    }
    None
}

/// Fills the report from the uncapped check (the algorithms always meet the capped one).
fn finish_report(
    pool: &[Candidate],
    order: &[usize],
    targets: &GroupShares,
    counts: &mut Vec<usize>,
    report: &mut RerankReport,
) {
    if let Some(violation) = first_count_violation(pool, order, targets, counts) {
        report.satisfied = false;
        report.fallback = true;
        report.violation = Some(violation);
        report.notes.push(format!(
            "the pool holds too few items of group {} for its share; every prefix keeps min(floor(t * share), available)",
            violation.group
        ));
    }
}

/// Marks a group without further items.
const EXHAUSTED: usize = usize::MAX;

/// Marks a zero-share group whose next item has not been looked up.
const UNKNOWN: usize = usize::MAX - 1;

/// Next pool position of `group` after `counts[group]` placed items.
fn next_of(lists: &mut GroupLists<'_>, counts: &[usize], group: usize) -> Option<usize> {
    lists.get(group, counts[group])
}

impl DetRanker {
    /// The group the published rule picks for 1-based position `prefix`, given each group's
    /// next pool position ([`EXHAUSTED`], or [`UNKNOWN`] for zero-share groups not looked up
    /// yet); `None` when no known group has items left.
    fn paper_choice(&self, next: &[usize], counts: &[usize], prefix: usize) -> Option<usize> {
        let mut below_min: Option<(usize, usize)> = None;
        for (group, &position) in next.iter().enumerate() {
            if position < UNKNOWN
                && counts[group] < floor_share(prefix, self.targets.share(group))
                && below_min.is_none_or(|(_, best)| position < best)
            {
                below_min = Some((group, position));
            }
        }
        if let Some((group, _)) = below_min {
            return Some(group);
        }
        // (group, key, next position); smaller key wins, then better score.
        let mut best: Option<(usize, f64, usize)> = None;
        let mut any: Option<(usize, usize)> = None;
        for (group, &position) in next.iter().enumerate() {
            if position >= UNKNOWN {
                continue;
            }
            if any.is_none_or(|(_, best_position)| position < best_position) {
                any = Some((group, position));
            }
            let share = self.targets.share(group);
            let ceiling = ceil_share(prefix, share);
            if counts[group] >= ceiling {
                continue;
            }
            let key = match self.variant {
                DetVariant::Greedy => 0.0,
                DetVariant::Cons => ceiling as f64 / share,
                DetVariant::Relaxed => (ceiling as f64 / share - 1e-9).ceil(),
            };
            let better = match best {
                None => true,
                Some((_, best_key, best_position)) => {
                    key < best_key || (key == best_key && position < best_position)
                }
            };
            if better {
                best = Some((group, key, position));
            }
        }
        // Both sets empty (groups exhausted): the best remaining item.
        best.map(|(group, _, _)| group)
            .or(any.map(|(group, _)| group))
    }
}

/// Deadline bookkeeping for the feasibility guard over the listed groups.
struct Guard<'s> {
    shares: &'s GroupShares,
    /// Items of each listed group that the constraints up to `length` can demand.
    available: &'s [usize],
    length: usize,
}

impl Guard<'_> {
    /// The prefix by which the `count`-th item of `group` must be placed (`usize::MAX`: never).
    fn deadline(&self, group: usize, count: usize) -> usize {
        if count > self.available[group] {
            return usize::MAX;
        }
        share_deadline(count, self.shares.share(group)).unwrap_or(usize::MAX)
    }

    /// Whether placing `choice` at 1-based position `prefix` keeps every remaining minimum
    /// reachable: no prefix before the choice's own next deadline may be tight. `pending`
    /// holds each listed group's next deadline.
    fn allows(
        &self,
        choice: usize,
        prefix: usize,
        counts: &[usize],
        pending: &[usize],
        scan: &mut GuardScan,
    ) -> bool {
        let listed = self.shares.len();
        let earliest = pending.iter().copied().min().unwrap_or(usize::MAX);
        let own = if choice < listed {
            pending[choice]
        } else {
            usize::MAX
        };
        // Earliest-deadline-first is always safe; so is anything when nothing is pending.
        if earliest == usize::MAX || (own != usize::MAX && own == earliest) {
            return true;
        }
        let limit = own.saturating_sub(1).min(self.length);
        if limit < prefix || earliest > limit {
            return true;
        }
        let GuardScan {
            next_deadlines,
            consumed,
        } = scan;
        next_deadlines.clear();
        next_deadlines.extend_from_slice(pending);
        consumed.clear();
        consumed.resize(listed, 0);
        let active = pending
            .iter()
            .filter(|&&deadline| deadline != usize::MAX)
            .count() as isize;
        // Walk the pending deadlines in order; `demand` counts those at or before `moment`.
        let mut demand = 0isize;
        loop {
            let Some(&moment) = next_deadlines.iter().min() else {
                return true;
            };
            if moment > limit {
                return true;
            }
            for group in 0..listed {
                while next_deadlines[group] == moment {
                    demand += 1;
                    consumed[group] += 1;
                    next_deadlines[group] =
                        self.deadline(group, counts[group] + consumed[group] + 1);
                }
            }
            // Free positions in [prefix, moment] minus items due by then (before placing).
            let slack = (moment as isize - (prefix as isize - 1)) - demand;
            if slack <= 0 {
                return false;
            }
            // Slack can drop by at most (active - 1) later, so no later prefix can be tight.
            if slack >= active {
                return true;
            }
        }
    }

    /// The listed group with the earliest pending deadline (ties: best next score).
    fn earliest(pending: &[usize], next: &[usize]) -> Option<usize> {
        let mut best: Option<(usize, usize, usize)> = None;
        for (group, &deadline) in pending.iter().enumerate() {
            let position = next[group];
            if deadline == usize::MAX || position >= UNKNOWN {
                continue;
            }
            if best.is_none_or(|(_, best_deadline, best_position)| {
                deadline < best_deadline || (deadline == best_deadline && position < best_position)
            }) {
                best = Some((group, deadline, position));
            }
        }
        best.map(|(group, _, _)| group)
    }
}

/// Buffers for one guard scan.
struct GuardScan<'b> {
    next_deadlines: &'b mut Vec<usize>,
    consumed: &'b mut Vec<usize>,
}

impl Reranker for DetRanker {
    fn name(&self) -> &str {
        self.variant.name()
    }

    fn violation(
        &self,
        pool: &[Candidate],
        order: &[usize],
    ) -> Result<Option<Violation>, FairnessError> {
        Ok(check_min_counts(pool, order, &self.targets))
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
        self.solve(pool, None, k, out)
    }

    fn rerank_summarized(
        &self,
        pool: &[Candidate],
        summary: &PoolSummary,
        k: usize,
        _state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        summary.check(pool)?;
        self.solve(pool, Some(summary), k, out)
    }
}

impl DetRanker {
    /// The re-ranking; with a `summary` the group sizes come from it instead of pool scans.
    fn solve(
        &self,
        pool: &[Candidate],
        summary: Option<&PoolSummary>,
        k: usize,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        out.reset();
        out.state = None;
        validate_pool(pool)?;
        let length = k.min(pool.len());
        if length == 0 {
            return Ok(());
        }
        let RerankOutput {
            order,
            report,
            scratch,
            ..
        } = out;
        let listed = self.targets.len();
        let mut lists =
            GroupLists::new(pool, self.targets.labels(), &mut scratch.lists).with_probing();
        if let Some(summary) = summary {
            group_totals(self.targets.labels(), summary, &mut scratch.totals);
            lists = lists.with_totals(&scratch.totals);
        }
        let counts = &mut scratch.counts;
        counts.clear();
        counts.resize(listed + 1, 0);
        let available = &mut scratch.counts2;
        available.clear();
        for group in 0..listed {
            let needed = floor_share(length, self.targets.share(group));
            lists.ensure(group, needed);
            available.push(lists.found(group).min(needed));
        }
        let guard = Guard {
            shares: &self.targets,
            available,
            length,
        };
        let next = &mut scratch.positions;
        next.clear();
        for group in 0..=listed {
            // Zero-share groups only serve as a fallback: look them up when needed, so a pool
            // without unlisted labels is not scanned to the end.
            next.push(if self.targets.share(group) > 0.0 {
                lists.get(group, 0).unwrap_or(EXHAUSTED)
            } else {
                UNKNOWN
            });
        }
        let pending = &mut scratch.deadlines;
        pending.clear();
        pending.extend((0..listed).map(|group| guard.deadline(group, 1)));
        let mut scan = GuardScan {
            next_deadlines: &mut scratch.positions2,
            consumed: &mut scratch.consumed,
        };
        let mut overrides = 0usize;
        for prefix in 1..=length {
            let preferred = match self.paper_choice(next, counts, prefix) {
                Some(group) => group,
                None => {
                    for (group, position) in next.iter_mut().enumerate() {
                        if *position == UNKNOWN {
                            *position = lists.get(group, counts[group]).unwrap_or(EXHAUSTED);
                        }
                    }
                    match self.paper_choice(next, counts, prefix) {
                        Some(group) => group,
                        None => break,
                    }
                }
            };
            let choice =
                if self.guard && !guard.allows(preferred, prefix, counts, pending, &mut scan) {
                    match Guard::earliest(pending, next) {
                        Some(group) => {
                            overrides += 1;
                            group
                        }
                        None => preferred,
                    }
                } else {
                    preferred
                };
            let position = next[choice];
            if position >= UNKNOWN {
                break;
            }
            order.push(position);
            counts[choice] += 1;
            next[choice] = lists.get(choice, counts[choice]).unwrap_or(EXHAUSTED);
            if choice < listed {
                pending[choice] = guard.deadline(choice, counts[choice] + 1);
            }
        }
        if overrides > 0 {
            report.notes.push(format!(
                "feasibility guard replaced the {} choice at {overrides} position(s) to keep later minimums reachable",
                self.variant.name()
            ));
        }
        finish_report(pool, order, &self.targets, counts, report);
        Ok(())
    }
}

impl Reranker for DetConstSort {
    fn name(&self) -> &str {
        "det-const-sort"
    }

    fn violation(
        &self,
        pool: &[Candidate],
        order: &[usize],
    ) -> Result<Option<Violation>, FairnessError> {
        Ok(check_min_counts(pool, order, &self.targets))
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
        self.solve(pool, None, k, out)
    }

    fn rerank_summarized(
        &self,
        pool: &[Candidate],
        summary: &PoolSummary,
        k: usize,
        _state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        summary.check(pool)?;
        self.solve(pool, Some(summary), k, out)
    }
}

impl DetConstSort {
    /// The re-ranking; with a `summary` the group sizes come from it instead of pool scans.
    fn solve(
        &self,
        pool: &[Candidate],
        summary: Option<&PoolSummary>,
        k: usize,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        out.reset();
        out.state = None;
        validate_pool(pool)?;
        let length = k.min(pool.len());
        if length == 0 {
            return Ok(());
        }
        let RerankOutput {
            order,
            report,
            scratch,
            ..
        } = out;
        let groups = self.targets.len() + 1;
        let mut lists =
            GroupLists::new(pool, self.targets.labels(), &mut scratch.lists).with_probing();
        if let Some(summary) = summary {
            group_totals(self.targets.labels(), summary, &mut scratch.totals);
            lists = lists.with_totals(&scratch.totals);
        }
        let counts = &mut scratch.counts;
        counts.clear();
        counts.resize(groups, 0);
        let minimums = &mut scratch.counts2;
        minimums.clear();
        minimums.resize(groups, 0);
        let max_index = &mut scratch.positions;
        max_index.clear();
        let changed = &mut scratch.pairs;
        // Per group: next pool position, and the next prefix at which its minimum grows.
        let next = &mut scratch.positions2;
        next.clear();
        let increase = &mut scratch.deadlines;
        increase.clear();
        for group in 0..groups {
            let share = self.targets.share(group);
            // Zero-share groups are never inserted (only the fill step uses them).
            next.push(if share > 0.0 {
                lists.get(group, 0).unwrap_or(EXHAUSTED)
            } else {
                EXHAUSTED
            });
            increase.push(share_deadline(1, share).unwrap_or(usize::MAX));
        }
        // The paper builds k_max + 1 entries before truncating to k_max.
        let target = (length + 1).min(pool.len());
        while order.len() < target {
            // Jump to the next prefix at which some group that still has items gains a minimum.
            let prefix = (0..groups)
                .filter(|&group| next[group] != usize::MAX)
                .map(|group| increase[group])
                .min()
                .unwrap_or(usize::MAX);
            if prefix == usize::MAX {
                break;
            }
            changed.clear();
            for group in 0..groups {
                let minimum = floor_share(prefix, self.targets.share(group));
                if minimum > minimums[group] {
                    minimums[group] = minimum;
                    increase[group] = share_deadline(minimum + 1, self.targets.share(group))
                        .unwrap_or(usize::MAX);
                    if next[group] != usize::MAX {
                        changed.push((next[group], group));
                    }
                }
            }
            // Descending score = ascending pool position.
            changed.sort_unstable();
            for &(position, group) in changed.iter() {
                order.push(position);
                max_index.push(prefix);
                let mut start = order.len() - 1;
                while start > 0 {
                    // The displaced item moves to 1-based position start + 1.
                    let displaced_fits = if self.paper_swap_test {
                        max_index[start - 1] >= start
                    } else {
                        max_index[start - 1] > start
                    };
                    if !(displaced_fits && pool[order[start - 1]].score < pool[order[start]].score)
                    {
                        break;
                    }
                    order.swap(start - 1, start);
                    max_index.swap(start - 1, start);
                    start -= 1;
                }
                counts[group] += 1;
                next[group] = lists.get(group, counts[group]).unwrap_or(usize::MAX);
            }
        }
        order.truncate(length);
        if order.len() < length {
            // Groups with a positive share ran out: fill with the best remaining items.
            while order.len() < length {
                let Some(group) = lists.best_next(counts) else {
                    break;
                };
                let Some(position) = next_of(&mut lists, counts, group) else {
                    break;
                };
                order.push(position);
                counts[group] += 1;
            }
            report.notes.push("groups with a positive share ran out of items; remaining positions filled in score order".to_string());
        }
        finish_report(pool, order, &self.targets, counts, report);
        Ok(())
    }
}
