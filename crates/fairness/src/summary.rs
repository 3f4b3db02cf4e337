//! Pool facts a caller already knows (items per group label), handed to re-rankers so they
//! need not scan the whole pool to learn them.

use crate::candidate::Candidate;
use crate::error::FairnessError;

/// The number of pool items per group label, ascending label, labels without items left out.
///
/// A caller that builds the pool in one pass (the server's engine) counts the groups on the
/// way and passes the summary to [`crate::Reranker::rerank_summarized`]; callers without one
/// use [`PoolSummary::of`]. A summary must describe the pool it is passed with: re-rankers
/// reject one whose item total differs from the pool length, and trust the per-label counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolSummary {
    /// `(label, items)`, ascending label, every count positive.
    groups: Vec<(u32, usize)>,
    /// Sum of the counts.
    items: usize,
}

impl PoolSummary {
    /// An empty summary (of an empty pool).
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `pool` per group label (one pass).
    pub fn of(pool: &[Candidate]) -> Self {
        let mut summary = Self::new();
        summary.count(pool);
        summary
    }

    /// Replaces the contents with the counts of `pool`, keeping the allocation.
    pub fn count(&mut self, pool: &[Candidate]) {
        self.clear();
        let mut small = [0usize; 64];
        let mut large = Vec::new();
        for candidate in pool {
            match small.get_mut(candidate.group as usize) {
                Some(count) => *count += 1,
                None => large.push(candidate.group),
            }
        }
        for (label, &count) in small.iter().enumerate() {
            self.add(label as u32, count);
        }
        large.sort_unstable();
        for run in large.chunk_by(|a, b| a == b) {
            self.add(run[0], run.len());
        }
    }

    /// Empties the summary, keeping the allocation.
    pub fn clear(&mut self) {
        self.groups.clear();
        self.items = 0;
    }

    /// Adds `count` items of group `label` (cheapest when labels come in ascending order;
    /// a zero count changes nothing).
    pub fn add(&mut self, label: u32, count: usize) {
        if count == 0 {
            return;
        }
        self.items = self.items.saturating_add(count);
        match self.groups.last_mut() {
            Some(last) if last.0 == label => last.1 = last.1.saturating_add(count),
            Some(last) if last.0 > label => {
                match self
                    .groups
                    .binary_search_by_key(&label, |&(known, _)| known)
                {
                    Ok(index) => self.groups[index].1 = self.groups[index].1.saturating_add(count),
                    Err(index) => self.groups.insert(index, (label, count)),
                }
            }
            _ => self.groups.push((label, count)),
        }
    }

    /// `(label, items)` per group with items, ascending label.
    pub fn groups(&self) -> &[(u32, usize)] {
        &self.groups
    }

    /// Items of group `label` in the pool.
    pub fn count_of(&self, label: u32) -> usize {
        self.groups
            .binary_search_by_key(&label, |&(known, _)| known)
            .map_or(0, |index| self.groups[index].1)
    }

    /// Total number of items.
    pub fn len(&self) -> usize {
        self.items
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// Checks that the summary counts as many items as `pool` holds.
    pub fn check(&self, pool: &[Candidate]) -> Result<(), FairnessError> {
        if self.items == pool.len() {
            Ok(())
        } else {
            Err(FairnessError::InvalidInput {
                function: "rerank_summarized",
                reason: format!(
                    "the pool summary counts {} items but the pool holds {}",
                    self.items,
                    pool.len()
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_small_and_large_labels_in_ascending_order() {
        let pool: Vec<Candidate> = [3u32, 70, 0, 3, 1_000_000, 70, 70]
            .iter()
            .enumerate()
            .map(|(i, &group)| Candidate::new(i as u32, 10.0 - i as f32, group))
            .collect();
        let summary = PoolSummary::of(&pool);
        assert_eq!(summary.groups(), &[(0, 1), (3, 2), (70, 3), (1_000_000, 1)]);
        assert_eq!(summary.len(), 7);
        assert_eq!(summary.count_of(70), 3);
        assert_eq!(summary.count_of(5), 0);
        assert!(summary.check(&pool).is_ok());
        assert!(summary.check(&pool[1..]).is_err());
        assert!(PoolSummary::of(&[]).is_empty());
    }

    #[test]
    fn adding_in_any_order_gives_the_same_summary() {
        let mut ascending = PoolSummary::new();
        for (label, count) in [(1, 2), (4, 1), (9, 3)] {
            ascending.add(label, count);
        }
        let mut shuffled = PoolSummary::new();
        for (label, count) in [(9, 1), (1, 2), (9, 2), (4, 0), (4, 1)] {
            shuffled.add(label, count);
        }
        assert_eq!(ascending, shuffled);
    }
}
