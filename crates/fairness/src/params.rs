//! Typed parsing of constraint parameters from a JSON object or a string map, with errors that
//! name the constraint and the parameter.

use serde_json::{Map, Value};

use crate::error::FairnessError;
use crate::groups::MAX_LISTED_GROUPS;
use crate::text::{json_clipped, quote_clipped};

/// The parameters of one constraint specification, handed to a registry factory.
///
/// Values may be JSON values or strings holding them (gRPC `map<string,string>`, CLI
/// `--param p=0.5`), so every getter accepts both `0.5` and `"0.5"`. The registry rejects
/// parameters that the constraint did not declare.
#[derive(Debug)]
pub struct Params<'a> {
    constraint: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Params<'a> {
    /// Parameters of `constraint` held in `map` (a `"name"` entry is ignored).
    pub fn new(constraint: &'a str, map: &'a Map<String, Value>) -> Self {
        Self { constraint, map }
    }

    /// The constraint being built.
    pub fn constraint(&self) -> &str {
        self.constraint
    }

    /// Parameter names present in the specification (except `name`).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map
            .keys()
            .map(String::as_str)
            .filter(|key| *key != "name")
    }

    /// The raw value of a parameter.
    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|value| !value.is_null())
    }

    /// An [`FairnessError::InvalidParameter`] for `name`.
    pub fn invalid(&self, name: &str, reason: impl Into<String>) -> FairnessError {
        FairnessError::InvalidParameter {
            constraint: self.constraint.to_string(),
            parameter: name.to_string(),
            reason: reason.into(),
        }
    }

    fn missing(&self, name: &str) -> FairnessError {
        FairnessError::MissingParameter {
            constraint: self.constraint.to_string(),
            parameter: name.to_string(),
        }
    }

    /// A required finite number.
    pub fn f64(&self, name: &str) -> Result<f64, FairnessError> {
        match self.raw(name) {
            Some(value) => self.number(name, value),
            None => Err(self.missing(name)),
        }
    }

    /// An optional finite number with a default.
    pub fn f64_or(&self, name: &str, default: f64) -> Result<f64, FairnessError> {
        match self.raw(name) {
            Some(value) => self.number(name, value),
            None => Ok(default),
        }
    }

    /// An optional boolean (`true`/`false`, `"true"`/`"false"`, `1`/`0`) with a default.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, FairnessError> {
        let Some(value) = self.raw(name) else {
            return Ok(default);
        };
        match value {
            Value::Bool(flag) => Ok(*flag),
            Value::Number(number) if number.as_u64() == Some(1) => Ok(true),
            Value::Number(number) if number.as_u64() == Some(0) => Ok(false),
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(self.invalid(
                    name,
                    format!("expected a boolean, got {}", quote_clipped(text)),
                )),
            },
            other => Err(self.invalid(
                name,
                format!("expected a boolean, got {}", json_clipped(other)),
            )),
        }
    }

    /// A required group label (a non-negative integer below 2^32).
    pub fn u32(&self, name: &str) -> Result<u32, FairnessError> {
        match self.raw(name) {
            Some(value) => self.label(name, value),
            None => Err(self.missing(name)),
        }
    }

    /// Required shares per group label: a JSON object `{"0": 0.5, "1": 0.3}`, or a string
    /// holding that object or `"0:0.5,1:0.3"`.
    pub fn shares(&self, name: &str) -> Result<Vec<(u32, f64)>, FairnessError> {
        let Some(value) = self.raw(name) else {
            return Err(self.missing(name));
        };
        let parsed_string;
        let object = match value {
            Value::Object(object) => object,
            Value::String(text) => {
                let text = text.trim();
                if text.starts_with('{') {
                    parsed_string = serde_json::from_str::<Value>(text).map_err(|error| {
                        self.invalid(name, format!("not a JSON object: {error}"))
                    })?;
                    match &parsed_string {
                        Value::Object(object) => object,
                        _ => return Err(self.invalid(name, "expected an object of shares")),
                    }
                } else {
                    return self.shares_from_pairs(name, text);
                }
            }
            other => {
                return Err(self.invalid(
                    name,
                    format!(
                        "expected an object of shares per group label, got {}",
                        json_clipped(other)
                    ),
                ));
            }
        };
        if object.is_empty() {
            return Err(self.invalid(name, "at least one group share is required"));
        }
        self.check_group_count(name, object.len())?;
        let mut shares = Vec::with_capacity(object.len());
        for (label, share) in object {
            let label = label.trim().parse::<u32>().map_err(|_| {
                self.invalid(
                    name,
                    format!(
                        "group label {} is not an unsigned 32-bit integer",
                        quote_clipped(label)
                    ),
                )
            })?;
            shares.push((label, self.number(name, share)?));
        }
        Ok(shares)
    }

    fn shares_from_pairs(&self, name: &str, text: &str) -> Result<Vec<(u32, f64)>, FairnessError> {
        let mut shares = Vec::new();
        for pair in text
            .split(',')
            .map(str::trim)
            .filter(|pair| !pair.is_empty())
        {
            let Some((label, share)) = pair.split_once(':').or_else(|| pair.split_once('=')) else {
                return Err(self.invalid(
                    name,
                    format!("expected `label:share`, got {}", quote_clipped(pair)),
                ));
            };
            let label = label.trim().parse::<u32>().map_err(|_| {
                self.invalid(
                    name,
                    format!(
                        "group label {} is not an unsigned 32-bit integer",
                        quote_clipped(label)
                    ),
                )
            })?;
            let share = share
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|share| share.is_finite())
                .ok_or_else(|| {
                    self.invalid(
                        name,
                        format!("share {} is not a finite number", quote_clipped(share)),
                    )
                })?;
            shares.push((label, share));
            self.check_group_count(name, shares.len())?;
        }
        if shares.is_empty() {
            return Err(self.invalid(name, "at least one group share is required"));
        }
        Ok(shares)
    }

    /// Refuses a list of more than [`MAX_LISTED_GROUPS`] groups before parsing the rest of it.
    fn check_group_count(&self, name: &str, count: usize) -> Result<(), FairnessError> {
        if count > MAX_LISTED_GROUPS {
            return Err(self.invalid(name, format!("more than {MAX_LISTED_GROUPS} groups listed")));
        }
        Ok(())
    }

    fn number(&self, name: &str, value: &Value) -> Result<f64, FairnessError> {
        let number = match value {
            Value::Number(number) => number.as_f64(),
            Value::String(text) => text.trim().parse::<f64>().ok(),
            _ => None,
        };
        match number {
            Some(number) if number.is_finite() => Ok(number),
            _ => Err(self.invalid(
                name,
                format!("expected a finite number, got {}", json_clipped(value)),
            )),
        }
    }

    fn label(&self, name: &str, value: &Value) -> Result<u32, FairnessError> {
        let label = match value {
            Value::Number(number) => number.as_u64().and_then(|n| u32::try_from(n).ok()),
            Value::String(text) => text.trim().parse::<u32>().ok(),
            _ => None,
        };
        label.ok_or_else(|| {
            self.invalid(
                name,
                format!(
                    "expected a group label (unsigned 32-bit integer), got {}",
                    json_clipped(value)
                ),
            )
        })
    }
}

/// Turns a CLI/gRPC string value into JSON: valid JSON text is parsed, anything else is kept
/// as a string.
pub fn value_from_string(text: &str) -> Value {
    serde_json::from_str::<Value>(text.trim()).unwrap_or_else(|_| Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    #[test]
    fn numbers_accept_json_and_strings_and_name_the_parameter_on_error() {
        let map = object(json!({"p": 0.5, "alpha": "0.1", "bad": "x", "inf": "inf"}));
        let params = Params::new("fa*ir", &map);
        assert_eq!(params.f64("p").expect("number"), 0.5);
        assert_eq!(params.f64("alpha").expect("string number"), 0.1);
        assert_eq!(params.f64_or("missing", 3.0).expect("default"), 3.0);
        let error = params.f64("bad").expect_err("not a number");
        assert!(error.to_string().contains("`bad`"), "{error}");
        assert!(params.f64("inf").is_err());
        assert!(matches!(
            params.f64("nope"),
            Err(FairnessError::MissingParameter { .. })
        ));
    }

    #[test]
    fn labels_and_booleans_parse_strictly() {
        let map = object(
            json!({"g": 3, "s": "7", "neg": -1, "frac": 1.5, "t": "true", "f": 0, "x": "maybe"}),
        );
        let params = Params::new("c", &map);
        assert_eq!(params.u32("g").expect("label"), 3);
        assert_eq!(params.u32("s").expect("label string"), 7);
        assert!(params.u32("neg").is_err());
        assert!(params.u32("frac").is_err());
        assert!(params.bool_or("t", false).expect("bool"));
        assert!(!params.bool_or("f", true).expect("bool"));
        assert!(params.bool_or("x", true).is_err());
        assert!(params.bool_or("absent", true).expect("default"));
    }

    #[test]
    fn shares_parse_objects_json_strings_and_pair_lists() {
        let map = object(json!({
            "a": {"0": 0.5, "1": "0.3"},
            "b": "{\"2\": 0.2}",
            "c": "0:0.5, 1:0.25",
            "d": "0:x",
            "e": {"zero": 0.5},
            "f": {}
        }));
        let params = Params::new("det-greedy", &map);
        let mut a = params.shares("a").expect("object");
        a.sort_by_key(|pair| pair.0);
        assert_eq!(a, vec![(0, 0.5), (1, 0.3)]);
        assert_eq!(params.shares("b").expect("json string"), vec![(2, 0.2)]);
        assert_eq!(
            params.shares("c").expect("pairs"),
            vec![(0, 0.5), (1, 0.25)]
        );
        assert!(params.shares("d").is_err());
        assert!(params.shares("e").is_err());
        assert!(params.shares("f").is_err());
    }

    #[test]
    fn shares_refuse_more_groups_than_the_limit_in_every_form() {
        let pairs = |count: u32| {
            (0..count)
                .map(|label| format!("{label}:0"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let as_object = |count: u32| {
            Value::Object(
                (0..count)
                    .map(|label| (label.to_string(), json!(0.0)))
                    .collect(),
            )
        };
        let limit = MAX_LISTED_GROUPS as u32;
        let map = object(json!({
            "pairs_at_limit": pairs(limit),
            "pairs_over": pairs(limit + 1),
            "object_at_limit": as_object(limit),
            "object_over": as_object(limit + 1),
        }));
        let params = Params::new("det-greedy", &map);
        assert_eq!(
            params.shares("pairs_at_limit").expect("at the limit").len(),
            MAX_LISTED_GROUPS
        );
        assert_eq!(
            params
                .shares("object_at_limit")
                .expect("at the limit")
                .len(),
            MAX_LISTED_GROUPS
        );
        for over in ["pairs_over", "object_over"] {
            let error = params.shares(over).expect_err("over the limit").to_string();
            assert!(
                error.contains(over) && error.contains("more than 1024 groups"),
                "{error}"
            );
        }
    }

    #[test]
    fn string_values_become_json_when_they_parse() {
        assert_eq!(value_from_string("0.5"), json!(0.5));
        assert_eq!(value_from_string("true"), json!(true));
        assert_eq!(value_from_string("{\"1\": 0.5}"), json!({"1": 0.5}));
        assert_eq!(value_from_string("0:0.5,1:0.5"), json!("0:0.5,1:0.5"));
    }
}
