//! Example: adding a research constraint (`max-share`, a cap on any group's share of every
//! prefix) to the registry. Walked through in `docs/adding-a-constraint.md`; its tests run
//! with `cargo test -p fairness`.

use fairness::{
    AmortizedState, Candidate, ConstraintInfo, FairnessError, Measure, Params, Registry,
    RerankOutput, Reranker, Violation, ceil_share, validate_pool,
};
use rand::SeedableRng;

/// No group may hold more than `ceil(t * max_share)` of the top `t`, for every prefix `t`.
///
/// Greedy: each position takes the best remaining item whose group is still under its cap.
/// If every remaining item belongs to capped groups, it takes the best one anyway and reports
/// the first violated prefix (the best feasible ranking, as the trait requires).
#[derive(Debug, Clone)]
pub struct MaxShare {
    max_share: f64,
}

impl MaxShare {
    /// Validates `max_share` in (0, 1].
    pub fn new(max_share: f64) -> Result<Self, String> {
        if max_share > 0.0 && max_share <= 1.0 {
            Ok(Self { max_share })
        } else {
            Err(format!("{max_share} must lie in (0, 1]"))
        }
    }

    /// The registry entry: documentation plus a factory reading typed parameters.
    pub fn register(registry: &mut Registry) -> Result<(), FairnessError> {
        registry.register(
            ConstraintInfo::new("max-share", "caps every group's share of every prefix").required(
                "max_share",
                "largest share of any prefix one group may hold, in (0, 1]",
            ),
            |params: &Params<'_>| {
                let max_share = params.f64("max_share")?;
                let reranker = MaxShare::new(max_share)
                    .map_err(|reason| params.invalid("max_share", reason))?;
                Ok(Box::new(reranker) as Box<dyn Reranker>)
            },
        )
    }
}

impl Reranker for MaxShare {
    fn name(&self) -> &str {
        "max-share"
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "name": self.name(), "max_share": self.max_share })
    }

    /// Checks any order (the server uses it for answers it returns instead of ours).
    fn violation(
        &self,
        pool: &[Candidate],
        order: &[usize],
    ) -> Result<Option<Violation>, FairnessError> {
        let mut counts: Vec<(u32, usize)> = Vec::new();
        for (index, &position) in order.iter().enumerate() {
            let Some(candidate) = pool.get(position) else {
                continue;
            };
            let prefix = index + 1;
            let cap = ceil_share(prefix, self.max_share).max(1);
            let count = match counts
                .iter_mut()
                .find(|(label, _)| *label == candidate.group)
            {
                Some(entry) => {
                    entry.1 += 1;
                    entry.1
                }
                None => {
                    counts.push((candidate.group, 1));
                    1
                }
            };
            // Counts only grow while caps stay put or grow by one, so checking the group
            // just placed finds the first violated prefix.
            if count > cap {
                return Ok(Some(Violation {
                    prefix,
                    group: candidate.group,
                    required: cap as f64,
                    actual: count as f64,
                    measure: Measure::Count,
                }));
            }
        }
        Ok(None)
    }

    fn rerank(
        &self,
        pool: &[Candidate],
        k: usize,
        _state: Option<&AmortizedState>,
        _rng: &mut dyn rand::RngCore,
        out: &mut RerankOutput,
    ) -> Result<(), FairnessError> {
        out.reset();
        out.state = None;
        validate_pool(pool)?;
        let length = k.min(pool.len());
        // (group, count) pairs of the answer so far; groups per answer are few.
        let mut counts: Vec<(u32, usize)> = Vec::new();
        let mut taken = vec![false; pool.len()];
        for prefix in 1..=length {
            let cap = ceil_share(prefix, self.max_share).max(1);
            let count_of = |counts: &[(u32, usize)], group: u32| {
                counts
                    .iter()
                    .find(|(label, _)| *label == group)
                    .map_or(0, |&(_, count)| count)
            };
            let under_cap = (0..pool.len()).find(|&position| {
                !taken[position] && count_of(&counts, pool[position].group) < cap
            });
            let Some(position) =
                under_cap.or_else(|| (0..pool.len()).find(|&position| !taken[position]))
            else {
                break;
            };
            taken[position] = true;
            out.order.push(position);
            let group = pool[position].group;
            match counts.iter_mut().find(|(label, _)| *label == group) {
                Some(entry) => entry.1 += 1,
                None => counts.push((group, 1)),
            }
            let count = count_of(&counts, group);
            if count > cap && out.report.violation.is_none() {
                out.report.satisfied = false;
                out.report.fallback = true;
                // For a cap, `required` is the largest allowed count.
                out.report.violation = Some(Violation {
                    prefix,
                    group,
                    required: cap as f64,
                    actual: count as f64,
                    measure: Measure::Count,
                });
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), FairnessError> {
    let mut registry = Registry::with_builtins();
    MaxShare::register(&mut registry)?;
    let reranker = registry.build(&serde_json::json!({"name": "max-share", "max_share": 0.5}))?;
    let pool: Vec<Candidate> = (0..12)
        .map(|i| Candidate::new(i, 1.0 - i as f32 * 0.05, u32::from(i >= 8)))
        .collect();
    let mut out = RerankOutput::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    reranker.rerank(&pool, 6, None, &mut rng, &mut out)?;
    let groups: Vec<u32> = out.ranked(&pool).map(|candidate| candidate.group).collect();
    println!(
        "order {:?} groups {:?} satisfied {}",
        out.order, groups, out.report.satisfied
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut registry = Registry::with_builtins();
        MaxShare::register(&mut registry).expect("name is free");
        registry
    }

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(0)
    }

    #[test]
    fn caps_every_prefix_when_feasible() {
        let pool: Vec<Candidate> = (0..20)
            .map(|i| Candidate::new(i, 100.0 - i as f32, u32::from(i >= 10)))
            .collect();
        let reranker = registry()
            .build(&serde_json::json!({"name": "max-share", "max_share": 0.5}))
            .expect("builds");
        let mut out = RerankOutput::new();
        reranker
            .rerank(&pool, 10, None, &mut rng(), &mut out)
            .expect("reranks");
        assert!(out.report.satisfied);
        let mut count = [0usize; 2];
        for (index, candidate) in out.ranked(&pool).enumerate() {
            count[candidate.group as usize] += 1;
            let cap = ceil_share(index + 1, 0.5).max(1);
            assert!(count.iter().all(|&c| c <= cap), "prefix {}", index + 1);
        }
    }

    #[test]
    fn reports_the_first_violation_when_one_group_runs_out() {
        let pool: Vec<Candidate> = (0..6)
            .map(|i| Candidate::new(i, 10.0 - i as f32, u32::from(i == 0)))
            .collect();
        let reranker = MaxShare::new(0.5).expect("valid");
        let mut out = RerankOutput::new();
        reranker
            .rerank(&pool, 4, None, &mut rng(), &mut out)
            .expect("reranks");
        assert!(!out.report.satisfied && out.report.fallback);
        let violation = out.report.violation.expect("violation");
        assert_eq!(violation.group, 0);
        assert_eq!(out.order.len(), 4);
        // The check of any order finds the same first violation as the re-ranker reports.
        assert_eq!(
            reranker.violation(&pool, &out.order).expect("checks"),
            Some(violation)
        );
        let score_order: Vec<usize> = (0..4).collect();
        let first = reranker
            .violation(&pool, &score_order)
            .expect("checks")
            .expect("group 0 holds 3 of the top 4, its cap is 2");
        assert_eq!((first.prefix, first.group), (4, 0));
        let feasible: Vec<usize> = vec![1, 0];
        assert_eq!(reranker.violation(&pool, &feasible).expect("checks"), None);
    }

    #[test]
    fn registry_reports_bad_and_unknown_parameters_by_name() {
        let registry = registry();
        let error = registry
            .build(&serde_json::json!({"name": "max-share", "max_share": 2.0}))
            .expect_err("out of range");
        assert!(error.to_string().contains("max_share"), "{error}");
        let error = registry
            .build(&serde_json::json!({"name": "max-share", "max_shar": 0.5}))
            .expect_err("typo");
        assert!(
            matches!(error, FairnessError::UnknownParameter { .. }),
            "{error}"
        );
        let mut twice = registry;
        assert!(matches!(
            MaxShare::register(&mut twice),
            Err(FairnessError::DuplicateConstraint { .. })
        ));
        let rebuilt = twice
            .build(&MaxShare::new(0.25).expect("valid").config())
            .expect("config round-trips");
        assert_eq!(rebuilt.config()["max_share"], 0.25);
    }

    #[test]
    fn main_runs() {
        assert!(main().is_ok());
    }
}
