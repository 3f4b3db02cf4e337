//! Layered explanations: a reason code, a sentence, and the top contributing dimensions.

use crate::request::ExplainLevel;
use crate::response::{
    DimensionContribution, Explanation, NonPersonalizedReason, Reason, ReasonCode,
};

/// What an explanation of one item is built from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ItemFacts<'a> {
    /// Position in the answer, 1-based.
    pub rank: u32,
    /// Position in the unconstrained pool order, 1-based.
    pub unconstrained_rank: u32,
    /// The score the ranking used (dot product or prior).
    pub score: f32,
    /// The item's embedding.
    pub item: &'a [f32],
}

/// How the answer was produced.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Basis<'a> {
    /// By dot product with this user embedding.
    Personalized { user: &'a [f32] },
    /// By a differentially private selection of `picks` items from the user's scores:
    /// explained from the released order and public item data only.
    Private { picks: usize },
    /// By item prior (or catalog order when `has_prior` is false), for this reason.
    NonPersonalized {
        reason: NonPersonalizedReason,
        has_prior: bool,
    },
}

/// Everything explanations of one answer share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Explainer<'a> {
    /// Level applied (already lowered to `Text` for answers without a user embedding).
    pub level: ExplainLevel,
    /// Contributions per item at level `Dimensions`.
    pub max_dimensions: usize,
    /// Dimension names of the item table.
    pub dim_names: Option<&'a [String]>,
    /// Number of items scored.
    pub scored_items: usize,
    /// How the answer was produced.
    pub basis: Basis<'a>,
}

impl Explainer<'_> {
    /// The explanation of one item, or `None` at level `None`.
    pub fn explain(&self, facts: &ItemFacts<'_>) -> Option<Explanation> {
        if self.level == ExplainLevel::None {
            return None;
        }
        let with_text = self.level >= ExplainLevel::Text;
        let (code, text) = match self.basis {
            Basis::Personalized { .. } => (
                ReasonCode::ProfileMatch,
                with_text.then(|| {
                    format!(
                        "Matches your profile: its score {:.4} is the {} highest of the {} items considered.",
                        facts.score,
                        ordinal(facts.unconstrained_rank),
                        self.scored_items
                    )
                }),
            ),
            Basis::Private { picks } => (
                ReasonCode::PrivacyRandomized,
                with_text.then(|| {
                    format!(
                        "Picked for your profile by a privacy-protecting randomized selection: {} in the private order of {} items chosen from the {} considered (exact scores are not used in this explanation).",
                        ordinal(facts.unconstrained_rank),
                        picks,
                        self.scored_items
                    )
                }),
            ),
            Basis::NonPersonalized {
                reason,
                has_prior: true,
            } => (
                ReasonCode::ItemPrior,
                with_text.then(|| {
                    format!(
                        "Popular item: ranked {} of {} by the catalog's popularity prior ({:.4}), not by your profile, because {}.",
                        ordinal(facts.unconstrained_rank),
                        self.scored_items,
                        facts.score,
                        reason.describe()
                    )
                }),
            ),
            Basis::NonPersonalized {
                reason,
                has_prior: false,
            } => (
                ReasonCode::CatalogOrder,
                with_text.then(|| {
                    format!(
                        "Shown in catalog order (position {} of {}), not by your profile, because {}; the catalog has no popularity prior.",
                        facts.unconstrained_rank,
                        self.scored_items,
                        reason.describe()
                    )
                }),
            ),
        };
        let mut reasons = vec![Reason {
            code,
            text: text.unwrap_or_default(),
        }];
        if facts.rank != facts.unconstrained_rank {
            let promoted = facts.rank < facts.unconstrained_rank;
            reasons.push(Reason {
                code: if promoted {
                    ReasonCode::FairnessPromoted
                } else {
                    ReasonCode::FairnessDemoted
                },
                text: if with_text {
                    format!(
                        "{} from position {} to {} by the fairness policy.",
                        if promoted { "Moved up" } else { "Moved down" },
                        facts.unconstrained_rank,
                        facts.rank
                    )
                } else {
                    String::new()
                },
            });
        }
        let contributions = match (self.level, self.basis) {
            (ExplainLevel::Dimensions, Basis::Personalized { user }) => {
                top_contributions(user, facts.item, self.max_dimensions, self.dim_names)
            }
            _ => Vec::new(),
        };
        Some(Explanation {
            reasons,
            contributions,
        })
    }
}

/// The `count` dimensions with the largest `|user[i] * item[i]|`, largest first (ties by
/// dimension index ascending).
pub(crate) fn top_contributions(
    user: &[f32],
    item: &[f32],
    count: usize,
    names: Option<&[String]>,
) -> Vec<DimensionContribution> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(count + 1);
    if count == 0 {
        return Vec::new();
    }
    // Ranks before: larger magnitude, then smaller index (candidates arrive by index).
    for (dimension, (&u, &v)) in user.iter().zip(item).enumerate() {
        let contribution = u * v;
        let magnitude = contribution.abs();
        if best.len() == count
            && best
                .last()
                .is_some_and(|&(_, worst)| magnitude <= worst.abs())
        {
            continue;
        }
        let position = best.partition_point(|&(_, kept)| kept.abs() >= magnitude);
        best.insert(position, (dimension as u32, contribution));
        best.truncate(count);
    }
    best.into_iter()
        .map(|(dimension, contribution)| DimensionContribution {
            dimension,
            name: names.and_then(|names| names.get(dimension as usize).cloned()),
            contribution,
        })
        .collect()
}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `12th`, `13th`, `21st`, ...
fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals() {
        let cases = [
            (1, "1st"),
            (2, "2nd"),
            (3, "3rd"),
            (4, "4th"),
            (11, "11th"),
            (12, "12th"),
            (13, "13th"),
            (21, "21st"),
            (102, "102nd"),
            (111, "111th"),
        ];
        for (n, expected) in cases {
            assert_eq!(ordinal(n), expected);
        }
    }

    #[test]
    fn contributions_are_the_largest_magnitudes_with_index_ties() {
        let user = [1.0, -2.0, 0.5, 3.0, 2.0, -1.0];
        let item = [1.0, 1.0, 1.0, -1.0, 1.0, 1.0];
        // Products: 1, -2, 0.5, -3, 2, -1 -> by |.|: dim 3 (-3), dim 1 (-2), dim 4 (2), ...
        let names: Vec<String> = (0..6).map(|i| format!("d{i}")).collect();
        let top = top_contributions(&user, &item, 3, Some(&names));
        let dims: Vec<u32> = top.iter().map(|c| c.dimension).collect();
        assert_eq!(dims, vec![3, 1, 4]);
        assert_eq!(top[0].contribution, -3.0);
        assert_eq!(top[0].name.as_deref(), Some("d3"));
        // Brute force over every count.
        for count in 0..8 {
            let mut all: Vec<(u32, f32)> = user
                .iter()
                .zip(&item)
                .enumerate()
                .map(|(i, (u, v))| (i as u32, u * v))
                .collect();
            all.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
            all.truncate(count);
            let found: Vec<(u32, f32)> = top_contributions(&user, &item, count, None)
                .iter()
                .map(|c| (c.dimension, c.contribution))
                .collect();
            assert_eq!(found, all, "count {count}");
        }
    }

    #[test]
    fn levels_are_cumulative() {
        let user = [1.0, 2.0];
        let item = [3.0, 1.0];
        let facts = ItemFacts {
            rank: 1,
            unconstrained_rank: 1,
            score: 5.0,
            item: &item,
        };
        let explainer = |level| Explainer {
            level,
            max_dimensions: 3,
            dim_names: None,
            scored_items: 10,
            basis: Basis::Personalized { user: &user },
        };
        assert_eq!(explainer(ExplainLevel::None).explain(&facts), None);
        let reasons = explainer(ExplainLevel::Reasons).explain(&facts).unwrap();
        assert_eq!(reasons.reasons[0].code, ReasonCode::ProfileMatch);
        assert!(reasons.reasons[0].text.is_empty());
        assert!(reasons.contributions.is_empty());
        let text = explainer(ExplainLevel::Text).explain(&facts).unwrap();
        assert!(
            text.reasons[0].text.contains("1st highest of the 10"),
            "{:?}",
            text.reasons
        );
        let dims = explainer(ExplainLevel::Dimensions).explain(&facts).unwrap();
        assert_eq!(dims.contributions.len(), 2);
        let sum: f32 = dims.contributions.iter().map(|c| c.contribution).sum();
        assert_eq!(sum, facts.score);
    }

    #[test]
    fn non_personalized_text_says_why() {
        let item = [0.0];
        let facts = ItemFacts {
            rank: 2,
            unconstrained_rank: 2,
            score: 0.0,
            item: &item,
        };
        let explainer = |has_prior| Explainer {
            level: ExplainLevel::Dimensions,
            max_dimensions: 3,
            dim_names: None,
            scored_items: 5,
            basis: Basis::NonPersonalized {
                reason: NonPersonalizedReason::ConsentDenied,
                has_prior,
            },
        };
        let prior = explainer(true).explain(&facts).unwrap();
        assert_eq!(prior.reasons[0].code, ReasonCode::ItemPrior);
        assert!(prior.reasons[0].text.contains("not consented"));
        assert!(prior.contributions.is_empty());
        let catalog = explainer(false).explain(&facts).unwrap();
        assert_eq!(catalog.reasons[0].code, ReasonCode::CatalogOrder);
        assert!(catalog.reasons[0].text.contains("no popularity prior"));
    }
}
