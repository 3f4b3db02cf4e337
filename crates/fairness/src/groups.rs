//! Group bookkeeping shared by the constraints: label-to-index maps, target shares, and lazily
//! built per-group lists of pool positions.

use crate::candidate::Candidate;
use crate::error::FairnessError;
use crate::summary::PoolSummary;

/// Target shares per listed group label, plus the implicit "rest" group.
///
/// Listed labels get dense indices `0..len()` in ascending label order; every label that is
/// not listed belongs to the rest group with dense index `len()`, whose share is
/// `1 - sum(shares)` (Geyik et al. 2019 specify a distribution over all attribute values; the
/// rest group stands for all values not listed).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupShares {
    labels: Vec<u32>,
    shares: Vec<f64>,
    rest_share: f64,
}

/// Largest accepted excess of the share sum over 1 (rounding of decimal inputs).
const SUM_TOLERANCE: f64 = 1e-9;

/// Most groups a constraint's targets may list. The share-based constraints spend
/// `O(k × groups)` per ranking, so the count a request may name is bounded (a table with
/// more attribute values than this still works: unlisted values form the rest group).
pub const MAX_LISTED_GROUPS: usize = 1024;

impl GroupShares {
    /// Validates `(label, share)` pairs: shares in [0, 1], labels distinct, sum at most 1.
    pub fn new(pairs: &[(u32, f64)]) -> Result<Self, String> {
        if pairs.len() > MAX_LISTED_GROUPS {
            return Err(format!(
                "{} groups listed; at most {MAX_LISTED_GROUPS} are allowed",
                pairs.len()
            ));
        }
        let mut sorted: Vec<(u32, f64)> = pairs.to_vec();
        sorted.sort_by_key(|&(label, _)| label);
        for window in sorted.windows(2) {
            if window[0].0 == window[1].0 {
                return Err(format!("group {} is listed twice", window[0].0));
            }
        }
        let mut sum = 0.0;
        for &(label, share) in &sorted {
            if !share.is_finite() || !(0.0..=1.0).contains(&share) {
                return Err(format!(
                    "share of group {label} is {share}; shares must lie in [0, 1]"
                ));
            }
            sum += share;
        }
        if sum > 1.0 + SUM_TOLERANCE {
            return Err(format!("shares sum to {sum}, more than 1"));
        }
        let rest = 1.0 - sum;
        Ok(Self {
            labels: sorted.iter().map(|&(label, _)| label).collect(),
            shares: sorted.iter().map(|&(_, share)| share).collect(),
            rest_share: if rest < SUM_TOLERANCE { 0.0 } else { rest },
        })
    }

    /// Number of listed groups (the rest group has index `len()`).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether no group is listed.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Listed labels in ascending order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Share of the dense group index (`len()` is the rest group).
    pub fn share(&self, dense: usize) -> f64 {
        self.shares.get(dense).copied().unwrap_or(self.rest_share)
    }

    /// Share left to the groups that are not listed.
    pub fn rest_share(&self) -> f64 {
        self.rest_share
    }

    /// `(label, share)` pairs of the listed groups.
    pub fn pairs(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        self.labels.iter().copied().zip(self.shares.iter().copied())
    }

    /// Dense index of a label (`len()` for labels that are not listed).
    pub fn dense(&self, label: u32) -> usize {
        dense_index(&self.labels, label)
    }

    /// The listed shares as a JSON object `{"label": share}`.
    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .pairs()
            .map(|(label, share)| (label.to_string(), serde_json::json!(share)))
            .collect();
        serde_json::Value::Object(map)
    }
}

/// Dense index of `label` among sorted `labels`, or `labels.len()` when absent.
pub(crate) fn dense_index(labels: &[u32], label: u32) -> usize {
    if labels.len() <= 8 {
        labels
            .iter()
            .position(|&listed| listed == label)
            .unwrap_or(labels.len())
    } else {
        labels.binary_search(&label).unwrap_or(labels.len())
    }
}

/// Per-group lists of pool positions (in pool order), filled by one forward scan of the pool
/// that only goes as far as the callers need.
///
/// Invariant: every list holds exactly its group's positions in `0..scanned`, and a group
/// marked complete has no items at or after `scanned`.
#[derive(Debug)]
pub(crate) struct GroupLists<'a> {
    pool: &'a [Candidate],
    labels: &'a [u32],
    lists: &'a mut Vec<Vec<usize>>,
    scanned: usize,
    /// Whether a request for more items than a group has left probes ahead first.
    probing: bool,
    /// Bit `g` set: group `g` (< 64) has no items at or after `scanned`.
    complete: u64,
    /// Items of each group in the whole pool, when the caller knows them (a [`PoolSummary`]).
    totals: Option<&'a [usize]>,
}

impl<'a> GroupLists<'a> {
    /// Empty lists for `labels.len() + 1` groups (the last one collects unlisted labels),
    /// reusing the allocations in `lists`.
    pub(crate) fn new(
        pool: &'a [Candidate],
        labels: &'a [u32],
        lists: &'a mut Vec<Vec<usize>>,
    ) -> Self {
        let groups = labels.len() + 1;
        if lists.len() < groups {
            lists.resize_with(groups, Vec::new);
        }
        for list in lists.iter_mut() {
            list.clear();
        }
        Self {
            pool,
            labels,
            lists,
            scanned: 0,
            probing: false,
            complete: 0,
            totals: None,
        }
    }

    /// Uses the pool's items per group (`totals[g]` for group `g`, the last entry the rest
    /// group; see [`group_totals`]): a request for more items than a group has then scans
    /// only up to its last item, and an absent group costs no scan at all. `totals` must
    /// describe the pool; answers are unchanged.
    pub(crate) fn with_totals(mut self, totals: &'a [usize]) -> Self {
        self.totals = Some(totals);
        self
    }

    /// Probe ahead before scanning: a request for more items of a group (below 64) than the
    /// rest of the pool holds then scans only up to the group's last item, instead of
    /// filling every list to the end of the pool (a group absent from a 10,000-item pool
    /// costs one cheap pass, not 10,000 list insertions). Answers are unchanged.
    pub(crate) fn with_probing(mut self) -> Self {
        self.probing = true;
        self
    }

    fn is_complete(&self, group: usize) -> bool {
        group < 64 && self.complete & (1u64 << group) != 0
    }

    /// Files the positions `scanned..end` into their groups' lists.
    fn scan_to(&mut self, end: usize) {
        let end = end.min(self.pool.len());
        while self.scanned < end {
            let position = self.scanned;
            self.scanned += 1;
            let dense = dense_index(self.labels, self.pool[position].group);
            self.lists[dense].push(position);
        }
    }

    /// Number of groups including the rest group.
    pub(crate) fn groups(&self) -> usize {
        self.labels.len() + 1
    }

    /// Scans until group `group` has at least `count` positions or the pool ends; returns
    /// whether it has them.
    pub(crate) fn ensure(&mut self, group: usize, count: usize) -> bool {
        let Some(current) = self.lists.get(group).map(Vec::len) else {
            return false;
        };
        if current >= count {
            return true;
        }
        if self.is_complete(group) {
            return false;
        }
        if let Some(totals) = self.totals {
            // Never look for more items than the group has: the scan then stops at its last
            // item (or does not start), and the group is complete once all are filed.
            let total = totals.get(group).copied().unwrap_or(0);
            let reachable = count.min(total);
            let has = current >= reachable || self.ensure_uncapped(group, reachable);
            if self.lists.get(group).map_or(0, Vec::len) >= total && group < 64 {
                self.complete |= 1u64 << group;
            }
            return has && reachable >= count;
        }
        self.ensure_uncapped(group, count)
    }

    /// [`GroupLists::ensure`] without the totals (for `count` above the group's list length).
    fn ensure_uncapped(&mut self, group: usize, count: usize) -> bool {
        let current = self.lists.get(group).map_or(0, Vec::len);
        if self.probing && group < 64 && group <= self.labels.len() {
            // Find where the `count`-th item of the group lies (or its last item) without
            // filing anything, then file up to there.
            let needed = count - current;
            let rest = &self.pool[self.scanned..];
            let (found, end) = match self.labels.get(group) {
                Some(&label) => probe(rest, needed, |other| other == label),
                None => {
                    // The rest group: labels not listed. Listed labels below 64 as a bit set.
                    let labels = self.labels;
                    let listed_small = labels
                        .iter()
                        .filter(|&&label| label < 64)
                        .fold(0u64, |set, &label| set | (1u64 << label));
                    let all_small = labels.iter().all(|&label| label < 64);
                    probe(rest, needed, |other| {
                        if other < 64 {
                            listed_small & (1u64 << other) == 0
                        } else {
                            all_small || !labels.contains(&other)
                        }
                    })
                }
            };
            self.scan_to(self.scanned + end);
            if found < needed {
                self.complete |= 1u64 << group;
                return false;
            }
            return true;
        }
        while self.scanned < self.pool.len() {
            let position = self.scanned;
            self.scanned += 1;
            let dense = dense_index(self.labels, self.pool[position].group);
            self.lists[dense].push(position);
            if dense == group && self.lists[dense].len() >= count {
                return true;
            }
        }
        false
    }

    /// The `index`-th pool position of `group` (0-based), scanning further if needed.
    pub(crate) fn get(&mut self, group: usize, index: usize) -> Option<usize> {
        if self.ensure(group, index + 1) {
            self.lists
                .get(group)
                .and_then(|list| list.get(index))
                .copied()
        } else {
            None
        }
    }

    /// Positions of `group` found so far.
    pub(crate) fn found(&self, group: usize) -> usize {
        self.lists.get(group).map_or(0, Vec::len)
    }

    /// The group whose next unplaced item (given `counts` placed per group) comes first in the
    /// pool, i.e. has the best score; `None` when every group is exhausted.
    pub(crate) fn best_next(&mut self, counts: &[usize]) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for group in 0..self.groups() {
            let placed = counts.get(group).copied().unwrap_or(0);
            if let Some(position) = self.get(group, placed)
                && best.is_none_or(|(_, best_position)| position < best_position)
            {
                best = Some((group, position));
            }
        }
        best.map(|(group, _)| group)
    }
}

/// Counts the candidates of `rest` whose label satisfies `matches`, stopping at the
/// `needed`-th: returns the count and the offset just past the last one counted (0 if none).
#[inline]
fn probe(rest: &[Candidate], needed: usize, matches: impl Fn(u32) -> bool) -> (usize, usize) {
    let mut found = 0usize;
    let mut end = 0usize;
    for (offset, candidate) in rest.iter().enumerate() {
        if matches(candidate.group) {
            found += 1;
            end = offset + 1;
            if found == needed {
                break;
            }
        }
    }
    (found, end)
}

/// Items of each listed group of `labels` in the pool described by `summary`, then the rest
/// group (labels not listed), into `totals` (for [`GroupLists::with_totals`]).
pub(crate) fn group_totals(labels: &[u32], summary: &PoolSummary, totals: &mut Vec<usize>) {
    totals.clear();
    totals.extend(labels.iter().map(|&label| summary.count_of(label)));
    let listed: usize = totals.iter().sum();
    totals.push(summary.len().saturating_sub(listed));
}

/// Parses and checks the `targets` of a share-based constraint into [`GroupShares`].
pub(crate) fn shares_or_error(
    constraint: &str,
    parameter: &str,
    pairs: &[(u32, f64)],
) -> Result<GroupShares, FairnessError> {
    GroupShares::new(pairs).map_err(|reason| FairnessError::InvalidParameter {
        constraint: constraint.to_string(),
        parameter: parameter.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(groups: &[u32]) -> Vec<Candidate> {
        groups
            .iter()
            .enumerate()
            .map(|(i, &g)| Candidate::new(i as u32, 100.0 - i as f32, g))
            .collect()
    }

    #[test]
    fn group_shares_validate_and_compute_the_rest() {
        let shares = GroupShares::new(&[(2, 0.2), (0, 0.5)]).expect("valid");
        assert_eq!(shares.labels(), &[0, 2]);
        assert_eq!(shares.dense(2), 1);
        assert_eq!(shares.dense(7), 2);
        assert!((shares.rest_share() - 0.3).abs() < 1e-12);
        assert!((shares.share(2) - 0.3).abs() < 1e-12);
        assert!(GroupShares::new(&[(0, 0.7), (1, 0.4)]).is_err());
        assert!(GroupShares::new(&[(0, -0.1)]).is_err());
        assert!(GroupShares::new(&[(0, 0.1), (0, 0.2)]).is_err());
        let most: Vec<(u32, f64)> = (0..MAX_LISTED_GROUPS as u32).map(|g| (g, 0.0)).collect();
        assert!(GroupShares::new(&most).is_ok());
        let too_many: Vec<(u32, f64)> = (0..=MAX_LISTED_GROUPS as u32).map(|g| (g, 0.0)).collect();
        let error = GroupShares::new(&too_many).expect_err("one group too many");
        assert!(error.contains("at most 1024"), "{error}");
        let full = GroupShares::new(&[(0, 0.1), (1, 0.2), (2, 0.7)]).expect("sums to one");
        assert_eq!(full.rest_share(), 0.0);
    }

    #[test]
    fn group_lists_scan_lazily_and_collect_unlisted_labels_in_the_rest_group() {
        let pool = pool(&[5, 1, 5, 9, 1, 5]);
        let labels = [1u32, 9];
        let mut storage = Vec::new();
        let mut lists = GroupLists::new(&pool, &labels, &mut storage);
        assert_eq!(lists.get(0, 0), Some(1));
        assert_eq!(lists.scanned, 2);
        assert_eq!(lists.get(2, 1), Some(2));
        assert_eq!(lists.get(1, 0), Some(3));
        assert_eq!(lists.get(1, 1), None);
        assert_eq!(lists.scanned, 6);
        assert_eq!(lists.found(2), 3);
        assert_eq!(lists.best_next(&[0, 0, 0]), Some(2));
        assert_eq!(lists.best_next(&[2, 1, 3]), None);
    }

    #[test]
    fn probing_lists_answer_like_full_scans_but_stop_at_a_groups_last_item() {
        // Label 9 appears once, early; label 7 (rest group) never after position 2.
        let groups = [7, 1, 7, 9, 1, 1, 1, 1, 1, 1, 1, 1];
        let pool = pool(&groups);
        let labels = [1u32, 9];
        let (mut plain_storage, mut probing_storage) = (Vec::new(), Vec::new());
        let mut plain = GroupLists::new(&pool, &labels, &mut plain_storage);
        let mut probing = GroupLists::new(&pool, &labels, &mut probing_storage).with_probing();
        assert_eq!(probing.get(1, 0), Some(3));
        assert_eq!(probing.scanned, 4);
        assert_eq!(probing.get(1, 1), None);
        // The scan stopped after the last 9 instead of running to the end.
        assert_eq!(probing.scanned, 4);
        assert_eq!(probing.found(1), 1);
        assert_eq!(probing.get(1, 5), None);
        assert_eq!(probing.get(2, 2), None);
        assert_eq!(probing.scanned, 4);
        // Random access in a fixed pattern gives the same answers both ways.
        for round in 0..40usize {
            let group = round % 3;
            let index = (round * 7) % 11;
            assert_eq!(
                probing.get(group, index),
                plain.get(group, index),
                "group {group} index {index}"
            );
            assert_eq!(
                probing.best_next(&[round % 4, 0, round % 3]),
                plain.best_next(&[round % 4, 0, round % 3])
            );
        }
        for group in 0..3 {
            assert!(!probing.ensure(group, 100));
            assert!(!plain.ensure(group, 100));
            assert_eq!(probing.found(group), plain.found(group));
        }
    }
}
