//! Conversion of constraint parameters between `google.protobuf.Struct` (the wire form of
//! `FairnessPolicy.params`) and JSON objects (the form used by the config file and CLI),
//! following protobuf's canonical JSON mapping.
//!
//! Both directions are exact: every finite number survives a round trip unchanged.
//! Protobuf numbers are 64-bit floats, so integral values within ±2^53 are written to JSON
//! as integers (a registry reading `"protected": 1` as an unsigned integer sees `1`, not
//! `1.0`), and JSON integers beyond ±2^53 are refused rather than rounded.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};
use serde_json::{Map, Number, Value as Json};
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::error::ApiError;

/// Deepest nesting of objects and lists accepted in either direction (the top-level object
/// is depth 1). Protobuf decoding already limits nesting to about 50 `Struct` levels; this
/// bound keeps the recursion here small whatever the origin of the value.
pub const MAX_PARAMS_DEPTH: usize = 32;

/// Largest magnitude up to which every integer is exactly representable in an `f64`.
const MAX_EXACT_INTEGER: u64 = 1 << 53;

/// One step of the path to a value, kept as borrowed segments and only formatted on error.
#[derive(Debug, Clone, Copy)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// Formats a path as `a.b[2].c`.
fn format_path(path: &[Segment<'_>]) -> String {
    let mut text = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Segment::Index(index) => {
                // Writing to a String cannot fail.
                let _ = write!(text, "[{index}]");
            }
        }
    }
    text
}

/// Converts a protobuf `Struct` to a JSON object.
///
/// # Errors
/// [`ApiError::MissingValueKind`] for a `Value` without a kind, [`ApiError::NonFiniteNumber`]
/// for NaN or infinity, [`ApiError::TooDeep`] beyond [`MAX_PARAMS_DEPTH`].
///
/// # Example
/// ```
/// use api::params::{json_to_struct, struct_to_json};
///
/// let config = serde_json::json!({"p": 0.5, "alpha": 0.1, "protected": 1});
/// let object = config.as_object().expect("an object literal");
/// let wire = json_to_struct(object)?;
/// assert_eq!(&struct_to_json(&wire)?, object);
/// # Ok::<(), api::ApiError>(())
/// ```
pub fn struct_to_json(params: &Struct) -> Result<Map<String, Json>, ApiError> {
    let mut path = Vec::new();
    fields_to_json(&params.fields, &mut path)
}

/// Converts a JSON object to a protobuf `Struct`.
///
/// # Errors
/// [`ApiError::InexactInteger`] for integers beyond ±2^53, [`ApiError::TooDeep`] beyond
/// [`MAX_PARAMS_DEPTH`].
pub fn json_to_struct(object: &Map<String, Json>) -> Result<Struct, ApiError> {
    let mut path = Vec::new();
    Ok(Struct {
        fields: object_to_fields(object, &mut path)?,
    })
}

/// Fails with [`ApiError::TooDeep`] when an object or list at `path` would exceed the limit.
fn check_depth(path: &[Segment<'_>]) -> Result<(), ApiError> {
    // `path.len()` containers enclose the container about to be entered.
    if path.len() >= MAX_PARAMS_DEPTH {
        return Err(ApiError::TooDeep {
            path: format_path(path),
            limit: MAX_PARAMS_DEPTH,
        });
    }
    Ok(())
}

fn fields_to_json<'a>(
    fields: &'a BTreeMap<String, Value>,
    path: &mut Vec<Segment<'a>>,
) -> Result<Map<String, Json>, ApiError> {
    check_depth(path)?;
    let mut object = Map::new();
    for (key, value) in fields {
        path.push(Segment::Key(key));
        let json = value_to_json(value, path)?;
        path.pop();
        object.insert(key.clone(), json);
    }
    Ok(object)
}

fn value_to_json<'a>(value: &'a Value, path: &mut Vec<Segment<'a>>) -> Result<Json, ApiError> {
    let Some(kind) = &value.kind else {
        return Err(ApiError::MissingValueKind {
            path: format_path(path),
        });
    };
    Ok(match kind {
        Kind::NullValue(_) => Json::Null,
        Kind::BoolValue(flag) => Json::Bool(*flag),
        Kind::StringValue(text) => Json::String(text.clone()),
        Kind::NumberValue(number) => {
            Json::Number(
                number_to_json(*number).ok_or_else(|| ApiError::NonFiniteNumber {
                    path: format_path(path),
                })?,
            )
        }
        Kind::StructValue(inner) => Json::Object(fields_to_json(&inner.fields, path)?),
        Kind::ListValue(list) => {
            check_depth(path)?;
            let mut items = Vec::with_capacity(list.values.len());
            for (index, item) in list.values.iter().enumerate() {
                path.push(Segment::Index(index));
                items.push(value_to_json(item, path)?);
                path.pop();
            }
            Json::Array(items)
        }
    })
}

/// JSON form of a protobuf number: an integer when the value is integral and exact,
/// otherwise a float; `None` for NaN and infinities.
fn number_to_json(number: f64) -> Option<Number> {
    if !number.is_finite() {
        return None;
    }
    if number.fract() == 0.0 && number.abs() <= MAX_EXACT_INTEGER as f64 {
        // Exact: |number| <= 2^53 fits in i64 and is an integer (-0.0 becomes 0).
        return Some(Number::from(number as i64));
    }
    Number::from_f64(number)
}

fn object_to_fields<'a>(
    object: &'a Map<String, Json>,
    path: &mut Vec<Segment<'a>>,
) -> Result<BTreeMap<String, Value>, ApiError> {
    check_depth(path)?;
    let mut fields = BTreeMap::new();
    for (key, json) in object {
        path.push(Segment::Key(key));
        let value = json_to_value(json, path)?;
        path.pop();
        fields.insert(key.clone(), value);
    }
    Ok(fields)
}

fn json_to_value<'a>(json: &'a Json, path: &mut Vec<Segment<'a>>) -> Result<Value, ApiError> {
    let kind = match json {
        Json::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Json::Bool(flag) => Kind::BoolValue(*flag),
        Json::String(text) => Kind::StringValue(text.clone()),
        Json::Number(number) => Kind::NumberValue(json_number_to_f64(number, path)?),
        Json::Object(object) => Kind::StructValue(Struct {
            fields: object_to_fields(object, path)?,
        }),
        Json::Array(items) => {
            check_depth(path)?;
            let mut values = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                path.push(Segment::Index(index));
                values.push(json_to_value(item, path)?);
                path.pop();
            }
            Kind::ListValue(ListValue { values })
        }
    };
    Ok(Value { kind: Some(kind) })
}

/// The exact `f64` of a JSON number, refusing integers that an `f64` would round.
fn json_number_to_f64(number: &Number, path: &[Segment<'_>]) -> Result<f64, ApiError> {
    let inexact = || ApiError::InexactInteger {
        path: format_path(path),
        value: number.to_string(),
    };
    if let Some(integer) = number.as_i64() {
        if integer.unsigned_abs() > MAX_EXACT_INTEGER {
            return Err(inexact());
        }
        return Ok(integer as f64);
    }
    if number.as_u64().is_some() {
        // Only integers above i64::MAX reach here, all beyond 2^53.
        return Err(inexact());
    }
    number.as_f64().ok_or_else(|| ApiError::NonFiniteNumber {
        path: format_path(path),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn object(value: Json) -> Map<String, Json> {
        match value {
            Json::Object(map) => map,
            other => panic!("test input must be an object, got {other}"),
        }
    }

    fn number(value: f64) -> Value {
        Value {
            kind: Some(Kind::NumberValue(value)),
        }
    }

    #[test]
    fn fair_params_cross_the_wire_unchanged() {
        let config = object(json!({"p": 0.5, "alpha": 0.1, "protected": 1}));
        let wire = json_to_struct(&config).unwrap();
        assert_eq!(wire.fields["protected"], number(1.0));
        assert_eq!(wire.fields["p"], number(0.5));
        let back = struct_to_json(&wire).unwrap();
        assert_eq!(back, config);
        assert_eq!(back["protected"].as_u64(), Some(1));
    }

    #[test]
    fn det_greedy_targets_keep_their_nested_object() {
        let config = object(json!({"targets": {"0": 0.6, "1": 0.4}}));
        let wire = json_to_struct(&config).unwrap();
        let Some(Kind::StructValue(targets)) = &wire.fields["targets"].kind else {
            panic!("targets must be a nested struct: {wire:?}");
        };
        assert_eq!(targets.fields["1"], number(0.4));
        assert_eq!(struct_to_json(&wire).unwrap(), config);
    }

    #[test]
    fn integral_floats_become_json_integers() {
        let mut wire = Struct::default();
        wire.fields.insert("k".into(), number(3.0));
        wire.fields.insert("negative_zero".into(), number(-0.0));
        wire.fields.insert("temperature".into(), number(0.25));
        let json = struct_to_json(&wire).unwrap();
        assert_eq!(json["k"].as_i64(), Some(3));
        assert_eq!(json["negative_zero"].as_i64(), Some(0));
        assert_eq!(json["temperature"].as_f64(), Some(0.25));
        assert_eq!(json["temperature"].as_i64(), None);
    }

    #[test]
    fn non_finite_numbers_are_refused_with_their_path() {
        let mut inner = Struct::default();
        inner.fields.insert(
            "weights".into(),
            Value::from(vec![number(1.0), number(f64::NAN)]),
        );
        let mut wire = Struct::default();
        wire.fields
            .insert("outer".into(), Value::from(Kind::StructValue(inner)));
        assert_eq!(
            struct_to_json(&wire),
            Err(ApiError::NonFiniteNumber {
                path: "outer.weights[1]".into()
            })
        );
        let mut infinite = Struct::default();
        infinite
            .fields
            .insert("lambda".into(), number(f64::INFINITY));
        assert!(matches!(
            struct_to_json(&infinite),
            Err(ApiError::NonFiniteNumber { path }) if path == "lambda"
        ));
    }

    #[test]
    fn values_without_kind_are_refused() {
        let mut wire = Struct::default();
        wire.fields.insert("p".into(), Value { kind: None });
        assert_eq!(
            struct_to_json(&wire),
            Err(ApiError::MissingValueKind { path: "p".into() })
        );
    }

    #[test]
    fn integers_beyond_two_to_the_53_are_refused() {
        let exact =
            object(json!({"seed": 9_007_199_254_740_992_u64, "low": -9_007_199_254_740_992_i64}));
        assert!(json_to_struct(&exact).is_ok());
        for too_big in [
            json!({"seed": 9_007_199_254_740_993_u64}),
            json!({"seed": -9_007_199_254_740_993_i64}),
            json!({"seed": u64::MAX}),
        ] {
            assert!(matches!(
                json_to_struct(&object(too_big)),
                Err(ApiError::InexactInteger { path, .. }) if path == "seed"
            ));
        }
    }

    #[test]
    fn nesting_is_limited_in_both_directions() {
        let mut json = json!(1);
        for _ in 0..MAX_PARAMS_DEPTH {
            json = json!({ "a": json });
        }
        // MAX_PARAMS_DEPTH objects deep: accepted.
        let wire = json_to_struct(&object(json.clone())).unwrap();
        assert!(struct_to_json(&wire).is_ok());
        // One list more: refused.
        let deeper = object(json!({ "a": [json] }));
        assert!(matches!(
            json_to_struct(&deeper),
            Err(ApiError::TooDeep { .. })
        ));

        let mut value = number(1.0);
        for _ in 0..MAX_PARAMS_DEPTH {
            let mut level = Struct::default();
            level.fields.insert("a".into(), value);
            value = Value::from(Kind::StructValue(level));
        }
        let mut top = Struct::default();
        top.fields.insert("a".into(), value);
        assert!(matches!(
            struct_to_json(&top),
            Err(ApiError::TooDeep {
                limit: MAX_PARAMS_DEPTH,
                ..
            })
        ));
    }

    /// Finite numbers, strings, booleans and nulls nested up to four levels.
    fn wire_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Kind::NullValue(0)),
            any::<bool>().prop_map(Kind::BoolValue),
            "[a-z0-9 *_-]{0,8}".prop_map(Kind::StringValue),
            (-1e12f64..1e12).prop_map(Kind::NumberValue),
            (-1000i32..1000).prop_map(|n| Kind::NumberValue(f64::from(n))),
        ]
        .prop_map(|kind| Value { kind: Some(kind) });
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|values| Value::from(Kind::ListValue(ListValue { values }))),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|fields| Value::from(Kind::StructValue(Struct { fields }))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn struct_round_trip_through_json_is_exact(
            fields in prop::collection::btree_map("[a-z]{1,6}", wire_value(), 0..5)
        ) {
            let wire = Struct { fields };
            let json = struct_to_json(&wire).unwrap();
            prop_assert_eq!(json_to_struct(&json).unwrap(), wire);
        }
    }
}
