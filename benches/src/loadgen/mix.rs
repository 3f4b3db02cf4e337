//! Request kinds (`candidatesN`, `catalog`) and weighted request mixes parsed from `--mix`.

use std::fmt;

use crate::error::LoadgenError;

/// Largest candidate list a request kind may carry (the server's default candidate limit).
pub const MAX_CANDIDATES: usize = 100_000;

/// What one Rank request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// Rank this many candidate ids drawn at random (without repetition) from the catalog.
    Candidates(usize),
    /// Rank the whole catalog (empty candidate list).
    Catalog,
}

impl RequestKind {
    /// Parses `candidates<N>` (1 <= N <= [`MAX_CANDIDATES`]) or `catalog`.
    pub fn parse(text: &str) -> Result<Self, LoadgenError> {
        let text = text.trim();
        if text == "catalog" {
            return Ok(Self::Catalog);
        }
        let Some(count) = text.strip_prefix("candidates") else {
            return Err(LoadgenError::invalid(
                "request kind",
                text,
                "expected `catalog` or `candidates<N>` (e.g. candidates1000)",
            ));
        };
        let count: usize = count.parse().map_err(|_| {
            LoadgenError::invalid(
                "request kind",
                text,
                "the candidate count after `candidates` must be a whole number",
            )
        })?;
        if count == 0 || count > MAX_CANDIDATES {
            return Err(LoadgenError::invalid(
                "request kind",
                text,
                format!("the candidate count must be in 1..={MAX_CANDIDATES}"),
            ));
        }
        Ok(Self::Candidates(count))
    }

    /// Number of candidate ids the request carries (0 for the whole catalog).
    pub fn candidate_count(self) -> usize {
        match self {
            Self::Candidates(count) => count,
            Self::Catalog => 0,
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Candidates(count) => write!(formatter, "candidates{count}"),
            Self::Catalog => formatter.write_str("catalog"),
        }
    }
}

/// A weighted mix of request kinds: each request is of kind `i` with probability
/// `weight_i / sum(weights)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    kinds: Vec<RequestKind>,
    /// Cumulative normalized weights; the last entry is exactly 1.
    cumulative: Vec<f64>,
    weights: Vec<f64>,
}

impl Mix {
    /// Parses `kind[:weight][,kind[:weight]...]`, e.g. `candidates1000` or
    /// `candidates1000:0.8,catalog:0.2`. A missing weight is 1; weights must be finite and
    /// positive and are normalized to sum 1; a kind may appear only once.
    pub fn parse(text: &str) -> Result<Self, LoadgenError> {
        let invalid = |reason: String| LoadgenError::invalid("--mix", text, reason);
        let mut kinds = Vec::new();
        let mut weights = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(invalid("empty entry".into()));
            }
            let (kind_text, weight) = match part.split_once(':') {
                Some((kind_text, weight_text)) => {
                    let weight: f64 = weight_text.trim().parse().map_err(|_| {
                        invalid(format!(
                            "weight `{weight_text}` of `{kind_text}` is not a number"
                        ))
                    })?;
                    (kind_text, weight)
                }
                None => (part, 1.0),
            };
            if !(weight.is_finite() && weight > 0.0) {
                return Err(invalid(format!(
                    "weight of `{kind_text}` must be finite and positive"
                )));
            }
            let kind = RequestKind::parse(kind_text)?;
            if kinds.contains(&kind) {
                return Err(invalid(format!("`{kind}` appears more than once")));
            }
            kinds.push(kind);
            weights.push(weight);
        }
        Self::from_weights(kinds, weights).map_err(invalid)
    }

    /// A mix of a single kind.
    pub fn single(kind: RequestKind) -> Self {
        Self {
            kinds: vec![kind],
            cumulative: vec![1.0],
            weights: vec![1.0],
        }
    }

    fn from_weights(kinds: Vec<RequestKind>, weights: Vec<f64>) -> Result<Self, String> {
        let total: f64 = weights.iter().sum();
        if kinds.is_empty() || !(total.is_finite() && total > 0.0) {
            return Err("weights must have a finite positive sum".into());
        }
        let weights: Vec<f64> = weights.iter().map(|weight| weight / total).collect();
        let mut running = 0.0;
        let mut cumulative: Vec<f64> = weights
            .iter()
            .map(|weight| {
                running += weight;
                running
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Ok(Self {
            kinds,
            cumulative,
            weights,
        })
    }

    /// The kinds of the mix, in the order given.
    pub fn kinds(&self) -> &[RequestKind] {
        &self.kinds
    }

    /// The normalized weight of each kind (same order as [`Mix::kinds`]), summing to 1.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Index (into [`Mix::kinds`]) of the kind for a uniform draw `unit` in `[0, 1)`.
    pub fn pick(&self, unit: f64) -> usize {
        self.cumulative
            .iter()
            .position(|&bound| unit < bound)
            .unwrap_or(self.kinds.len() - 1)
    }
}

impl fmt::Display for Mix {
    /// Formats as `--mix` accepts it; a single kind is written without its weight.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [kind] = self.kinds.as_slice() {
            return write!(formatter, "{kind}");
        }
        for (index, (kind, weight)) in self.kinds.iter().zip(&self.weights).enumerate() {
            if index > 0 {
                formatter.write_str(",")?;
            }
            write!(formatter, "{kind}:{weight}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print_back() {
        for text in [
            "candidates100",
            "candidates1000",
            "candidates10000",
            "catalog",
        ] {
            assert_eq!(RequestKind::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            RequestKind::parse(" candidates7 ").unwrap(),
            RequestKind::Candidates(7)
        );
        assert_eq!(RequestKind::Catalog.candidate_count(), 0);
        assert_eq!(RequestKind::Candidates(42).candidate_count(), 42);
    }

    #[test]
    fn bad_kinds_are_refused() {
        for text in [
            "",
            "candidates",
            "candidates0",
            "candidates-5",
            "candidates1e3",
            "candidates100001",
            "Catalog",
            "users",
        ] {
            assert!(RequestKind::parse(text).is_err(), "{text} accepted");
        }
        assert!(RequestKind::parse("candidates100000").is_ok());
    }

    #[test]
    fn single_kind_mix_has_weight_one() {
        let mix = Mix::parse("candidates1000").unwrap();
        assert_eq!(mix.kinds(), [RequestKind::Candidates(1000)]);
        assert_eq!(mix.weights(), [1.0]);
        assert_eq!(mix.pick(0.0), 0);
        assert_eq!(mix.pick(0.999_999), 0);
        assert_eq!(mix.to_string(), "candidates1000");
        assert_eq!(mix, Mix::single(RequestKind::Candidates(1000)));
    }

    #[test]
    fn weighted_mix_normalizes_and_picks_by_cumulative_weight() {
        let mix = Mix::parse("candidates1000:0.8, catalog:0.2").unwrap();
        assert_eq!(
            mix.kinds(),
            [RequestKind::Candidates(1000), RequestKind::Catalog]
        );
        assert!((mix.weights()[0] - 0.8).abs() < 1e-12);
        assert!((mix.weights()[1] - 0.2).abs() < 1e-12);
        assert_eq!(mix.pick(0.0), 0);
        assert_eq!(mix.pick(0.79), 0);
        assert_eq!(mix.pick(0.81), 1);
        assert_eq!(mix.pick(0.999_999_999), 1);

        // Unnormalized weights and default weights.
        let mix = Mix::parse("candidates100:3,candidates10000,catalog:4").unwrap();
        let expected = [3.0 / 8.0, 1.0 / 8.0, 4.0 / 8.0];
        for (weight, expected) in mix.weights().iter().zip(expected) {
            assert!((weight - expected).abs() < 1e-12);
        }
        assert_eq!(mix.pick(0.374), 0);
        assert_eq!(mix.pick(0.376), 1);
        assert_eq!(mix.pick(0.49), 1);
        assert_eq!(mix.pick(0.51), 2);
        // Display parses back to the same mix.
        assert_eq!(Mix::parse(&mix.to_string()).unwrap(), mix);
    }

    #[test]
    fn bad_mixes_are_refused_with_the_reason() {
        for (text, needle) in [
            ("", "empty entry"),
            ("candidates100,", "empty entry"),
            ("candidates100:x", "not a number"),
            ("candidates100:0", "finite and positive"),
            ("candidates100:-1", "finite and positive"),
            ("candidates100:inf", "finite and positive"),
            ("candidates100:NaN", "finite and positive"),
            ("catalog,catalog:2", "more than once"),
            ("bogus:1", "expected `catalog`"),
        ] {
            let message = Mix::parse(text).unwrap_err().to_string();
            assert!(message.contains(needle), "{text}: {message}");
        }
    }
}
