//! `plackett-luce`: a stochastic ranking for expected-exposure fairness (Diaz et al., CIKM
//! 2020; Singh & Joachims 2019), sampled reproducibly from the injected RNG.
//!
//! The Plackett-Luce model with weights `exp(score / temperature)` picks each next position
//! with probability proportional to the weights of the remaining items. Its top k equals the
//! top k of `score / temperature + G_i` with independent standard Gumbel noise `G_i`
//! (Gumbel-max trick; Yellott 1977). Because the pool is sorted by score, we do not draw noise
//! for every item: after the first `k` items fill a min-heap of keys with threshold `tau`,
//! item `i` can only enter if `G_i > tau - s_i / T`, which has probability
//! `q_i = 1 - exp(-exp(-(tau - s_i / T)))`, non-increasing in `i` while `tau` only grows. We
//! skip ahead geometrically with the current bound `q` and accept a proposed item with
//! probability `q_i / q` (thinning of independent Bernoulli trials), then draw its key from the
//! Gumbel distribution conditioned on exceeding the threshold. The result has exactly the
//! Plackett-Luce distribution and costs `O(k log(n / k) log k)` draws instead of `O(n)`.

use crate::candidate::{Candidate, open_unit, validate_pool};
use crate::error::FairnessError;
use crate::reranker::{AmortizedState, RerankOutput, Reranker};

/// Plackett-Luce sampling at the given temperature. It promises no per-answer constraint (its
/// fairness is in expectation, measured by [`crate::metrics::expected_exposure()`]), so its
/// reports are always satisfied.
#[derive(Debug, Clone)]
pub struct PlackettLuce {
    temperature: f64,
    /// Run the original sampler (heap built by insertion, tail always recomputed): the
    /// test oracle.
    #[cfg(test)]
    reference: bool,
}

impl PlackettLuce {
    /// A sampler with `temperature > 0` (small: close to score order; large: close to uniform).
    pub fn new(temperature: f64) -> Result<Self, String> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(format!("{temperature} must be a finite positive number"));
        }
        Ok(Self {
            temperature,
            #[cfg(test)]
            reference: false,
        })
    }
}

/// A standard Gumbel draw.
fn gumbel(rng: &mut dyn rand::RngCore) -> f64 {
    -(-open_unit(rng).ln()).ln()
}

/// A standard Gumbel draw conditioned on exceeding `threshold`, given the exceedance
/// probability `tail = P(G > threshold)`.
fn gumbel_above(threshold: f64, tail: f64, rng: &mut dyn rand::RngCore) -> f64 {
    // CDF F(g) = exp(-exp(-g)); draw U uniform in (F(threshold), 1) as 1 - tail * V.
    let scaled = tail * open_unit(rng);
    let value = -(-(-scaled).ln_1p()).ln();
    value.max(threshold)
}

/// `P(G > x)` for a standard Gumbel variable, accurate in both tails.
fn gumbel_tail(x: f64) -> f64 {
    -(-(-x).exp()).exp_m1()
}

/// Min-heap on keys (ties: larger position is "smaller", so it leaves first).
fn heap_less(a: (f64, usize), b: (f64, usize)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 > b.1)
}

/// The old insertion one key at a time (the test oracle of [`heapify`]).
#[cfg(test)]
fn heap_push(heap: &mut Vec<(f64, usize)>, entry: (f64, usize)) {
    heap.push(entry);
    let mut child = heap.len() - 1;
    while child > 0 {
        let parent = (child - 1) / 2;
        if heap_less(heap[child], heap[parent]) {
            heap.swap(child, parent);
            child = parent;
        } else {
            break;
        }
    }
}

/// Moves `heap[parent]` down until neither child is smaller.
fn sift_down(heap: &mut [(f64, usize)], mut parent: usize) {
    loop {
        let left = 2 * parent + 1;
        let right = left + 1;
        let mut smallest = parent;
        if left < heap.len() && heap_less(heap[left], heap[smallest]) {
            smallest = left;
        }
        if right < heap.len() && heap_less(heap[right], heap[smallest]) {
            smallest = right;
        }
        if smallest == parent {
            break;
        }
        heap.swap(parent, smallest);
        parent = smallest;
    }
}

/// Turns `heap` into a min-heap in place (Floyd's bottom-up construction, O(n)).
///
/// The sampler only ever reads the heap's minimum and replaces it, and keys never tie on
/// position, so `heap_less` is a strict total order: any valid heap over the same entries
/// has the same minimum, and the answer equals the one built by inserting one key at a time.
fn heapify(heap: &mut [(f64, usize)]) {
    for parent in (0..heap.len() / 2).rev() {
        sift_down(heap, parent);
    }
}

fn heap_replace_min(heap: &mut [(f64, usize)], entry: (f64, usize)) {
    if heap.is_empty() {
        return;
    }
    heap[0] = entry;
    sift_down(heap, 0);
}

impl Reranker for PlackettLuce {
    fn name(&self) -> &str {
        "plackett-luce"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name(), "temperature": self.temperature })
    }

    fn is_stochastic(&self) -> bool {
        true
    }

    fn rerank(
        &self,
        pool: &[Candidate],
        k: usize,
        _state: Option<&AmortizedState>,
        rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        out.reset();
        out.state = None;
        validate_pool(pool)?;
        let length = k.min(pool.len());
        if length == 0 {
            return Ok(());
        }
        let inverse = 1.0 / self.temperature;
        let utility = |position: usize| f64::from(pool[position].score) * inverse;
        let RerankOutput { order, scratch, .. } = out;
        let heap = &mut scratch.heap;
        heap.clear();
        #[cfg(test)]
        let build = !self.reference;
        #[cfg(not(test))]
        let build = true;
        if build {
            // The same draws in the same order as inserting one at a time; one heap build.
            heap.extend((0..length).map(|position| (utility(position) + gumbel(rng), position)));
            heapify(heap);
        }
        #[cfg(test)]
        if self.reference {
            for position in 0..length {
                heap_push(heap, (utility(position) + gumbel(rng), position));
            }
        }
        let mut position = length;
        while position < pool.len() {
            let threshold = heap[0].0;
            // Upper bound for every later item: scores only decrease.
            let bound = gumbel_tail(threshold - utility(position));
            if bound <= 0.0 {
                break;
            }
            // Skip the items that do not beat the bound: Geometric(bound) failures.
            let mut skipped = false;
            if bound < 1.0 {
                let skip = (open_unit(rng).ln() / (-bound).ln_1p()).floor();
                if skip.is_nan() || skip >= (pool.len() - position) as f64 {
                    break;
                }
                position += skip as usize;
                skipped = skip > 0.0;
            }
            #[cfg(test)]
            let skipped = skipped || self.reference;
            // Without a skip the item is the one the bound was computed for.
            let local_tail = if skipped {
                gumbel_tail(threshold - utility(position))
            } else {
                bound
            };
            if open_unit(rng) * bound < local_tail {
                let noise = gumbel_above(threshold - utility(position), local_tail, rng);
                heap_replace_min(heap, (utility(position) + noise, position));
            }
            position += 1;
        }
        heap.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        order.extend(heap.iter().map(|&(_, position)| position));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::rng;
    use rand::RngCore;

    fn pool(scores: &[f32]) -> Vec<Candidate> {
        scores
            .iter()
            .enumerate()
            .map(|(i, &score)| Candidate::new(i as u32, score, 0))
            .collect()
    }

    #[test]
    fn same_seed_same_ranking_and_output_is_a_partial_permutation() {
        let scores: Vec<f32> = (0..500).map(|i| 5.0 - 0.01 * i as f32).collect();
        let pool = pool(&scores);
        let ranker = PlackettLuce::new(0.5).expect("valid");
        let mut first = RerankOutput::new();
        let mut second = RerankOutput::new();
        ranker
            .rerank(&pool, 20, None, &mut rng(7), &mut first)
            .expect("samples");
        ranker
            .rerank(&pool, 20, None, &mut rng(7), &mut second)
            .expect("samples");
        assert_eq!(first.order, second.order);
        let mut sorted = first.order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 20);
        ranker
            .rerank(&pool, 20, None, &mut rng(8), &mut second)
            .expect("samples");
        assert_ne!(first.order, second.order);
    }

    #[test]
    fn position_marginals_match_the_plackett_luce_probabilities() {
        // Flat scores and a high temperature force many replacements in the skipping sampler.
        let scores: Vec<f32> = (0..30).map(|i| 1.0 - 0.02 * i as f32).collect();
        let pool = pool(&scores);
        let temperature = 0.2;
        let ranker = PlackettLuce::new(temperature).expect("valid");
        let weights: Vec<f64> = scores
            .iter()
            .map(|&s| (f64::from(s) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let samples = 40_000;
        let mut first_counts = vec![0usize; pool.len()];
        let mut second_counts = vec![0usize; pool.len()];
        let mut generator = rng(11);
        let mut out = RerankOutput::new();
        for _ in 0..samples {
            ranker
                .rerank(&pool, 3, None, &mut generator, &mut out)
                .expect("samples");
            first_counts[out.order[0]] += 1;
            second_counts[out.order[1]] += 1;
        }
        for item in [0usize, 5, 15, 29] {
            let first = weights[item] / total;
            let second: f64 = (0..pool.len())
                .filter(|&other| other != item)
                .map(|other| weights[other] / total * weights[item] / (total - weights[other]))
                .sum();
            for (observed, expected) in [(first_counts[item], first), (second_counts[item], second)]
            {
                let observed = observed as f64 / samples as f64;
                let sigma = (expected * (1.0 - expected) / samples as f64).sqrt();
                assert!(
                    (observed - expected).abs() < 5.0 * sigma + 1e-4,
                    "item {item}: {observed} vs {expected}"
                );
            }
        }
    }

    /// A pool of `size` scores in non-increasing order with ties, from `seed`.
    fn random_pool(seed: u64, size: usize, spread: f32) -> Vec<Candidate> {
        use rand::Rng;
        let mut generator = rng(seed);
        let mut scores: Vec<f32> = (0..size)
            .map(|_| f32::from(generator.random_range(-400i16..400)) * spread / 400.0)
            .collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        pool(&scores)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// The heap built in one go and the reused tail give the original sampler's answer
        /// bit for bit (same draws, same order) for every seed.
        #[test]
        fn the_fast_sampler_equals_the_reference(
            pool_seed in 0u64..1000,
            size in 0usize..400,
            k in 0usize..120,
            temperature in proptest::sample::select(vec![1e-3, 0.05, 0.1, 0.5, 2.0, 50.0]),
            spread in proptest::sample::select(vec![0.0f32, 0.5, 5.0, 50.0]),
            seed in 0u64..u64::MAX,
        ) {
            let pool = random_pool(pool_seed, size, spread);
            let fast = PlackettLuce::new(temperature).expect("valid");
            let reference = PlackettLuce { reference: true, ..fast.clone() };
            let (mut expected, mut actual) = (RerankOutput::new(), RerankOutput::new());
            let (mut first, mut second) = (rng(seed), rng(seed));
            reference
                .rerank(&pool, k, None, &mut first, &mut expected)
                .expect("samples");
            fast.rerank(&pool, k, None, &mut second, &mut actual)
                .expect("samples");
            proptest::prop_assert_eq!(&expected.order, &actual.order);
            // Both consumed the same number of draws.
            proptest::prop_assert_eq!(first.next_u64(), second.next_u64());
        }
    }

    #[test]
    fn heapify_builds_a_min_heap() {
        let mut heap: Vec<(f64, usize)> = [5.0, 1.0, 3.0, 1.0, 9.0, -2.0, 4.0, 0.5]
            .iter()
            .enumerate()
            .map(|(position, &key)| (key, position))
            .collect();
        heapify(&mut heap);
        for child in 1..heap.len() {
            assert!(!heap_less(heap[child], heap[(child - 1) / 2]), "{heap:?}");
        }
        assert_eq!(heap[0], (-2.0, 5));
    }

    #[test]
    fn low_temperature_is_the_score_order() {
        let scores: Vec<f32> = (0..100).map(|i| 100.0 - i as f32).collect();
        let pool = pool(&scores);
        let mut out = RerankOutput::new();
        PlackettLuce::new(1e-3)
            .expect("valid")
            .rerank(&pool, 10, None, &mut rng(3), &mut out)
            .expect("samples");
        assert_eq!(out.order, (0..10).collect::<Vec<_>>());
        assert!(PlackettLuce::new(0.0).is_err());
    }
}
