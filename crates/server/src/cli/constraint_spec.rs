//! Constraint specifications on the command line: a JSON object or the compact
//! `name:key=value,...` form, turned into the JSON object the fairness registry builds from.
//!
//! Both forms name the same constraints and parameters as the gRPC API and the config file:
//!
//! - JSON: `'{"name": "fa*ir", "p": 0.5, "alpha": 0.1, "protected": 1}'`
//! - compact: `fa*ir:p=0.5,alpha=0.1,protected=1`, or a bare name such as `none`.
//!
//! In the compact form a value that is valid JSON is read as JSON (`0.5`, `true`,
//! `{"0": 0.5}`), anything else as a string. Commas inside `{...}`, `[...]` or a quoted string
//! do not split parameters, and a piece without `=` continues the previous value, so share
//! lists work unquoted: `det-greedy:targets=0:0.5,1:0.5` sets `targets` to `"0:0.5,1:0.5"`.

use serde_json::{Map, Value};

/// Parses a constraint specification into a JSON object with a string `name`.
pub fn parse_constraint_spec(text: &str) -> Result<Value, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty constraint specification".to_string());
    }
    if text.starts_with('{') {
        let value: Value = serde_json::from_str(text)
            .map_err(|error| format!("constraint {text:?} is not valid JSON: {error}"))?;
        return match &value {
            Value::Object(map) if matches!(map.get("name"), Some(Value::String(_))) => Ok(value),
            Value::Object(_) => Err(format!(
                "constraint {text:?} needs a string `name`, e.g. {{\"name\": \"fa*ir\", ...}}"
            )),
            _ => Err(format!("constraint {text:?} is not a JSON object")),
        };
    }
    let (name, rest) = match text.split_once(':') {
        Some((name, rest)) => (name.trim(), rest),
        None => (text, ""),
    };
    if name.is_empty() {
        return Err(format!("constraint {text:?} has an empty name"));
    }
    let mut map = Map::new();
    map.insert("name".to_string(), Value::String(name.to_string()));
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in split_top_level(rest) {
        match piece.split_once('=') {
            Some((key, value)) if !key.contains(['{', '[', '"']) => {
                let key = key.trim();
                if key.is_empty() {
                    return Err(format!("constraint {text:?}: parameter with an empty name"));
                }
                pairs.push((key.to_string(), value.to_string()));
            }
            _ => match pairs.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(piece);
                }
                None if piece.trim().is_empty() => {}
                None => {
                    return Err(format!(
                        "constraint {text:?}: expected `key=value`, got {:?}",
                        piece.trim()
                    ));
                }
            },
        }
    }
    for (key, value) in pairs {
        if key == "name" {
            return Err(format!(
                "constraint {text:?}: `name` goes before the colon, not in the parameters"
            ));
        }
        if map
            .insert(key.clone(), fairness::value_from_string(&value))
            .is_some()
        {
            return Err(format!(
                "constraint {text:?}: parameter `{key}` given twice"
            ));
        }
    }
    Ok(Value::Object(map))
}

/// Splits on commas that are not inside brackets, braces or double quotes.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    for (index, character) in text.char_indices() {
        if in_string {
            match character {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match character {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                pieces.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

/// A short human-readable label of a specification: `name(key=value, ...)`, or the bare name.
pub fn spec_label(spec: &Value) -> String {
    let Value::Object(map) = spec else {
        return spec.to_string();
    };
    let name = match map.get("name") {
        Some(Value::String(name)) => name.clone(),
        _ => "?".to_string(),
    };
    let params: Vec<String> = map
        .iter()
        .filter(|(key, _)| key.as_str() != "name")
        .map(|(key, value)| match value {
            Value::String(text) => format!("{key}={text}"),
            other => format!("{key}={other}"),
        })
        .collect();
    if params.is_empty() {
        name
    } else {
        format!("{name}({})", params.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_and_compact_forms_give_the_same_object() {
        let from_json =
            parse_constraint_spec(r#"{"name":"fa*ir","p":0.5,"alpha":0.1,"protected":1}"#)
                .expect("json");
        let compact = parse_constraint_spec("fa*ir:p=0.5,alpha=0.1,protected=1").expect("compact");
        assert_eq!(from_json, compact);
        assert_eq!(
            parse_constraint_spec(" none ").expect("bare"),
            json!({"name": "none"})
        );
    }

    #[test]
    fn share_lists_and_json_values_survive_the_comma_split() {
        let spec = parse_constraint_spec("det-greedy:targets=0:0.5,1:0.5").expect("pairs");
        assert_eq!(
            spec,
            json!({"name": "det-greedy", "targets": "0:0.5,1:0.5"})
        );
        let spec = parse_constraint_spec(r#"min-exposure:targets={"0": 0.3, "1": 0.3}"#)
            .expect("json value");
        assert_eq!(
            spec,
            json!({"name": "min-exposure", "targets": {"0": 0.3, "1": 0.3}})
        );
    }

    #[test]
    fn malformed_specifications_are_refused_with_the_reason() {
        assert!(parse_constraint_spec("").is_err());
        assert!(parse_constraint_spec(":p=1").is_err());
        assert!(parse_constraint_spec("fa*ir:p").is_err());
        assert!(parse_constraint_spec("fa*ir:p=1,p=2").is_err());
        assert!(parse_constraint_spec("{\"p\": 1}").is_err());
        assert!(parse_constraint_spec("{oops").is_err());
    }

    #[test]
    fn labels_list_parameters_after_the_name() {
        let spec = json!({"name": "fa*ir", "p": 0.5, "protected": 1});
        assert_eq!(spec_label(&spec), "fa*ir(p=0.5, protected=1)");
        assert_eq!(spec_label(&json!({"name": "none"})), "none");
    }
}
