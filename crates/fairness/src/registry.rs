//! The registry of constraints by name: typed parameter parsing and clear errors, shared by
//! gRPC, the config file and the CLI.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::constraints::det::{DetConstSort, DetRanker, DetVariant};
use crate::constraints::fair::FaStarIr;
use crate::constraints::fairco::FairCo;
use crate::constraints::min_exposure::MinExposure;
use crate::constraints::mtable::MTableCache;
use crate::constraints::none::ScoreOrder;
use crate::constraints::plackett_luce::PlackettLuce;
use crate::error::FairnessError;
use crate::groups::shares_or_error;
use crate::params::{Params, value_from_string};
use crate::reranker::Reranker;

/// Builds a re-ranker from parsed parameters. Factories read parameters through the typed
/// getters of [`Params`]; the registry rejects parameters that are not declared in the
/// constraint's [`ConstraintInfo`].
pub type Factory =
    Arc<dyn Fn(&Params<'_>) -> Result<Box<dyn Reranker>, FairnessError> + Send + Sync>;

/// Documentation of one parameter (for `--help`, errors and the docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Parameter name as written in JSON, config and CLI.
    pub name: String,
    /// Whether the parameter must be given.
    pub required: bool,
    /// Default value (as text) for optional parameters.
    pub default: Option<String>,
    /// One-line description including the unit and range.
    pub description: String,
}

/// Documentation of one constraint and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstraintInfo {
    /// Registry name, matched exactly (case-sensitive); built-in names are lower case.
    pub name: String,
    /// One-line summary with the reference.
    pub summary: String,
    /// Accepted parameters.
    pub params: Vec<ParamInfo>,
}

impl ConstraintInfo {
    /// A constraint with no parameters yet. `name` is kept exactly as given: requests must
    /// spell it the same way (see [`Registry::build_named`]).
    pub fn new(name: &str, summary: &str) -> Self {
        Self {
            name: name.to_string(),
            summary: summary.to_string(),
            params: Vec::new(),
        }
    }

    /// Declares a required parameter.
    pub fn required(mut self, name: &str, description: &str) -> Self {
        self.params.push(ParamInfo {
            name: name.to_string(),
            required: true,
            default: None,
            description: description.to_string(),
        });
        self
    }

    /// Declares an optional parameter with its default.
    pub fn optional(mut self, name: &str, default: &str, description: &str) -> Self {
        self.params.push(ParamInfo {
            name: name.to_string(),
            required: false,
            default: Some(default.to_string()),
            description: description.to_string(),
        });
        self
    }
}

struct Entry {
    info: ConstraintInfo,
    factory: Factory,
}

/// Constraints by name. Build one with [`Registry::with_builtins`] at startup, add research
/// constraints with [`Registry::register`], then [`Registry::build`] per configuration.
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    mtables: Arc<MTableCache>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Registry")
            .field("constraints", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_builtins()
    }
}

fn boxed<R: Reranker + 'static>(reranker: R) -> Result<Box<dyn Reranker>, FairnessError> {
    Ok(Box::new(reranker))
}

const TARGETS_HELP: &str = "share per group label, e.g. {\"0\": 0.5, \"1\": 0.3} or \"0:0.5,1:0.3\"; shares in [0, 1] summing to at most 1 (unlisted labels share the rest)";

impl Registry {
    /// A registry without constraints.
    pub fn empty() -> Self {
        Self {
            entries: BTreeMap::new(),
            mtables: Arc::new(MTableCache::default()),
        }
    }

    /// A registry with every built-in constraint.
    pub fn with_builtins() -> Self {
        let mut registry = Self::empty();
        registry.register_builtins();
        registry
    }

    fn register_builtins(&mut self) {
        let mtables = Arc::clone(&self.mtables);
        let builtins: Vec<(ConstraintInfo, Factory)> = vec![
            (
                ConstraintInfo::new("none", "the unconstrained score order"),
                Arc::new(|_: &Params<'_>| boxed(ScoreOrder)),
            ),
            (
                ConstraintInfo::new("fa*ir", "FA*IR ranked group fairness (Zehlike et al., CIKM 2017)")
                    .required("p", "minimum proportion of protected candidates, in (0, 1)")
                    .optional("alpha", "0.1", "significance level of the ranked group fairness test, in [1e-12, 0.5]")
                    .required("protected", "group label of the protected group")
                    .optional("adjust_alpha", "true", "correct alpha for testing every prefix (exact failure probability)"),
                Arc::new(move |params: &Params<'_>| {
                    let p = params.f64("p")?;
                    let alpha = params.f64_or("alpha", 0.1)?;
                    let protected = params.u32("protected")?;
                    let adjust = params.bool_or("adjust_alpha", true)?;
                    boxed(FaStarIr::new(p, alpha, protected, adjust, Arc::clone(&mtables))?)
                }),
            ),
            det_entry(DetVariant::Greedy, "DetGreedy (Geyik et al., KDD 2019) with a feasibility guard"),
            det_entry(DetVariant::Cons, "DetCons (Geyik et al., KDD 2019) with a feasibility guard"),
            det_entry(DetVariant::Relaxed, "DetRelaxed (Geyik et al., KDD 2019) with a feasibility guard"),
            (
                ConstraintInfo::new("det-const-sort", "DetConstSort (Geyik et al., KDD 2019) keeping every max index")
                    .required("targets", TARGETS_HELP),
                Arc::new(|params: &Params<'_>| {
                    let targets = shares_or_error(params.constraint(), "targets", &params.shares("targets")?)?;
                    boxed(DetConstSort::new(targets))
                }),
            ),
            (
                ConstraintInfo::new(
                    "min-exposure",
                    "minimum share of DCG-weighted exposure per group at near-optimal utility (Lagrangian bound, exact for small k)",
                )
                .required("targets", TARGETS_HELP),
                Arc::new(|params: &Params<'_>| {
                    let targets = shares_or_error(params.constraint(), "targets", &params.shares("targets")?)?;
                    boxed(MinExposure::new(targets))
                }),
            ),
            (
                ConstraintInfo::new("fairco", "FairCo amortized exposure fairness controller (Morik et al., SIGIR 2020)")
                    .required("lambda", "controller gain, from 0 to 1e6 (typical: 1e-4 to 100)"),
                Arc::new(|params: &Params<'_>| {
                    let lambda = params.f64("lambda")?;
                    boxed(FairCo::new(lambda).map_err(|reason| params.invalid("lambda", reason))?)
                }),
            ),
            (
                ConstraintInfo::new("plackett-luce", "Plackett-Luce sampling for expected exposure (Diaz et al., CIKM 2020)")
                    .optional("temperature", "1.0", "softmax temperature over scores, > 0"),
                Arc::new(|params: &Params<'_>| {
                    let temperature = params.f64_or("temperature", 1.0)?;
                    boxed(PlackettLuce::new(temperature).map_err(|reason| params.invalid("temperature", reason))?)
                }),
            ),
        ];
        for (info, factory) in builtins {
            let name = info.name.clone();
            self.entries.insert(name, Entry { info, factory });
        }
    }

    /// Adds a constraint; fails if the name is empty, has surrounding whitespace or
    /// control characters, is taken, or differs from a registered name only in letter case
    /// (names are matched exactly, so such pairs would only confuse).
    pub fn register<F>(&mut self, info: ConstraintInfo, factory: F) -> Result<(), FairnessError>
    where
        F: Fn(&Params<'_>) -> Result<Box<dyn Reranker>, FairnessError> + Send + Sync + 'static,
    {
        if info.name.is_empty() {
            return Err(FairnessError::InvalidSpec {
                reason: "a constraint name must not be empty".to_string(),
            });
        }
        if info.name.trim() != info.name || info.name.chars().any(char::is_control) {
            return Err(FairnessError::InvalidSpec {
                reason: format!(
                    "constraint name {:?} must not have surrounding whitespace or control characters",
                    info.name
                ),
            });
        }
        if self.entries.contains_key(&info.name) {
            return Err(FairnessError::DuplicateConstraint { name: info.name });
        }
        if let Some(similar) = self.similar_name(&info.name) {
            return Err(FairnessError::InvalidSpec {
                reason: format!(
                    "constraint name `{}` differs from the registered `{similar}` only in letter case",
                    info.name
                ),
            });
        }
        self.entries.insert(
            info.name.clone(),
            Entry {
                info,
                factory: Arc::new(factory),
            },
        );
        Ok(())
    }

    /// Documentation of every registered constraint, by name.
    pub fn constraints(&self) -> impl Iterator<Item = &ConstraintInfo> {
        self.entries.values().map(|entry| &entry.info)
    }

    /// Documentation of one constraint (exact, case-sensitive name).
    pub fn info(&self, name: &str) -> Option<&ConstraintInfo> {
        self.entries.get(name).map(|entry| &entry.info)
    }

    /// The registered name equal to `name` up to ASCII letter case and surrounding
    /// whitespace, if any (for the hint of an unknown-name error).
    fn similar_name(&self, name: &str) -> Option<&str> {
        let wanted = name.trim();
        self.entries
            .keys()
            .find(|known| known.eq_ignore_ascii_case(wanted))
            .map(String::as_str)
    }

    /// The mtable cache shared by the FA*IR re-rankers this registry builds.
    pub fn mtable_cache(&self) -> &Arc<MTableCache> {
        &self.mtables
    }

    /// Builds from a JSON object such as `{"name": "fa*ir", "p": 0.5, "protected": 1}`.
    pub fn build(&self, spec: &Value) -> Result<Box<dyn Reranker>, FairnessError> {
        let Value::Object(map) = spec else {
            return Err(FairnessError::InvalidSpec {
                reason: format!(
                    "expected a JSON object, got {}",
                    crate::text::json_clipped(spec)
                ),
            });
        };
        let name = match map.get("name") {
            Some(Value::String(name)) => name.as_str(),
            Some(other) => {
                return Err(FairnessError::InvalidSpec {
                    reason: format!(
                        "`name` must be a string, got {}",
                        crate::text::json_clipped(other)
                    ),
                });
            }
            None => {
                return Err(FairnessError::InvalidSpec {
                    reason: "missing the constraint `name`".to_string(),
                });
            }
        };
        self.build_named(name, map)
    }

    /// Builds constraint `name` with parameters in `params` (a `"name"` key is ignored).
    ///
    /// Names are matched exactly: case-sensitive, without trimming (`FA*IR` and ` fa*ir`
    /// are unknown; the error lists the registered names and points at `fa*ir`). gRPC, the
    /// config file and the CLI all resolve names here, so the contract is the same everywhere.
    pub fn build_named(
        &self,
        name: &str,
        params: &Map<String, Value>,
    ) -> Result<Box<dyn Reranker>, FairnessError> {
        let Some(entry) = self.entries.get(name) else {
            return Err(FairnessError::UnknownConstraint {
                name: name.to_string(),
                known: self.entries.keys().cloned().collect::<Vec<_>>().join(", "),
                hint: self
                    .similar_name(name)
                    .map(|similar| format!("; did you mean `{similar}`?"))
                    .unwrap_or_default(),
            });
        };
        let params = Params::new(&entry.info.name, params);
        for key in params.keys() {
            if !entry.info.params.iter().any(|param| param.name == key) {
                let expected = if entry.info.params.is_empty() {
                    "no parameters".to_string()
                } else {
                    entry
                        .info
                        .params
                        .iter()
                        .map(|param| param.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(FairnessError::UnknownParameter {
                    constraint: entry.info.name.clone(),
                    parameter: key.to_string(),
                    expected,
                });
            }
        }
        (entry.factory)(&params)
    }

    /// Builds from string parameters (CLI `--param key=value`, gRPC `map<string, string>`);
    /// values holding JSON (numbers, booleans, objects) are parsed as JSON.
    pub fn build_from_strings<'a, I>(
        &self,
        name: &str,
        params: I,
    ) -> Result<Box<dyn Reranker>, FairnessError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let map: Map<String, Value> = params
            .into_iter()
            .map(|(key, value)| (key.trim().to_string(), value_from_string(value)))
            .collect();
        self.build_named(name, &map)
    }
}

fn det_entry(variant: DetVariant, summary: &str) -> (ConstraintInfo, Factory) {
    (
        ConstraintInfo::new(variant.name(), summary).required("targets", TARGETS_HELP),
        Arc::new(move |params: &Params<'_>| {
            let targets =
                shares_or_error(params.constraint(), "targets", &params.shares("targets")?)?;
            boxed(DetRanker::new(variant, targets))
        }),
    )
}
