//! Brute-force exposure of groups in the top-k of every user, ranked by observed scores or by true
//! relevance: the yardstick for how strongly the latent bias under-exposes minority groups.

use std::ops::Range;

use crate::error::DatasetError;
use crate::synthetic::{SyntheticDataset, dot};

/// Which scores rank the items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// `<x_u, e_i>` with the observed (possibly biased) item embeddings: what a server sees.
    Observed,
    /// `<x_u, t_i>` with the true latent item vectors: the ground truth.
    TrueRelevance,
}

/// Position weight of the 1-based `rank`: `1 / log2(rank + 1)` (the DCG discount used for
/// exposure by Singh and Joachims, KDD 2018).
pub fn position_weight(rank: usize) -> f64 {
    1.0 / ((rank + 1) as f64).log2()
}

/// Mean share of position-weighted exposure each group receives in the top-`k` of the users in
/// `users`, ranked by `scoring`; entry `g` is group `g`'s share (shares sum to 1).
///
/// Exact brute force (every user scores every item), with ties broken by item index ascending:
/// meant for evaluation, not serving. `k` larger than the catalog is clamped to the catalog.
pub fn top_k_group_exposure(
    dataset: &SyntheticDataset,
    scoring: Scoring,
    k: usize,
    users: Range<usize>,
) -> Result<Vec<f64>, DatasetError> {
    let params = &dataset.params;
    params.validate()?;
    if k == 0 {
        return Err(DatasetError::invalid("k", "must be at least 1"));
    }
    if users.is_empty() {
        return Err(DatasetError::invalid("users", "the user range is empty"));
    }
    if users.end > params.users {
        return Err(DatasetError::IndexOutOfRange {
            what: "user",
            index: users.end - 1,
            len: params.users,
        });
    }
    let labels = dataset.item_groups();
    let item_count = labels.len().min(params.items);
    let k = k.min(item_count);
    let item_rows = match scoring {
        Scoring::Observed => &dataset.items.rows,
        Scoring::TrueRelevance => &dataset.true_item_vectors,
    };
    let mut scores = vec![0.0_f32; item_count];
    let mut order: Vec<u32> = Vec::with_capacity(item_count);
    let mut shares = vec![0.0_f64; params.groups];
    let total_weight: f64 = (1..=k).map(position_weight).sum();
    let user_count = users.len();
    for user in users {
        let user_row = dataset.user_vector(user)?;
        for (score, item_row) in scores.iter_mut().zip(item_rows.chunks_exact(params.dim)) {
            *score = dot(user_row, item_row);
        }
        top_k_indices(&scores, k, &mut order);
        for (position, &item) in order.iter().enumerate() {
            if let Some(share) = shares.get_mut(labels[item as usize] as usize) {
                *share += position_weight(position + 1) / total_weight;
            }
        }
    }
    for share in &mut shares {
        *share /= user_count as f64;
    }
    Ok(shares)
}

/// Writes into `order` the indices of the `k` highest scores, best first, ties by index ascending.
pub(crate) fn top_k_indices(scores: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..scores.len() as u32);
    let better = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(order.len());
    if k == 0 {
        order.clear();
        return;
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, better);
        order.truncate(k);
    }
    order.sort_unstable_by(better);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_indices_matches_a_full_sort() {
        let scores = [0.5, -1.0, 2.0, 0.5, 3.0, 0.0, 2.0];
        let mut order = Vec::new();
        top_k_indices(&scores, 4, &mut order);
        assert_eq!(order, vec![4, 2, 6, 0]);
        top_k_indices(&scores, 100, &mut order);
        assert_eq!(order, vec![4, 2, 6, 0, 3, 5, 1]);
        top_k_indices(&scores, 0, &mut order);
        assert!(order.is_empty());
    }

    #[test]
    fn position_weights_decrease_from_one() {
        assert_eq!(position_weight(1), 1.0);
        assert!((position_weight(3) - 0.5).abs() < 1e-15);
        assert!(position_weight(10) < position_weight(9));
    }
}
