//! The seam between the request path and the amortized fairness state (FairCo): per-scope
//! cumulative exposure and relevance by group, kept across requests. Implementations: in
//! memory ([`InMemoryExposureStore`]), and any `state` crate store, durable ones included
//! ([`AmortizedStoreAdapter`] over `state::DurableAmortizedStore`).
//!
//! A scope key is `"<attribute length>:<group_attribute>/<exposure_scope>"` (see
//! [`scope_key`]): amortized totals of different group attributes never mix, and the empty
//! exposure scope is the server-wide scope of that attribute.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use fairness::AmortizedState;

use crate::error::EngineError;

/// The read-modify-write step of [`ExposureStateStore::update`]: receives the scope's
/// state (the default, empty state for a new scope) and returns whether it changed. It
/// must leave the state untouched when it returns an error.
pub type StateUpdate<'a> = dyn FnMut(&mut AmortizedState) -> Result<bool, EngineError> + 'a;

/// Where amortized fairness state lives between requests.
///
/// Implementations serialize updates of one scope (an amortized controller must see the
/// totals of every earlier ranking of its scope) and may run updates of different scopes
/// concurrently. Stores that persist must make a changed state durable before `update`
/// returns, so an answered request is never forgotten by a restart.
pub trait ExposureStateStore: Send + Sync + fmt::Debug {
    /// The state of `scope`, or `None` if no ranking has been recorded in it.
    fn load(&self, scope: &str) -> Result<Option<AmortizedState>, EngineError>;

    /// Runs `apply` on the state of `scope` while holding the scope exclusively; when it
    /// returns `Ok(true)` the modified state is stored. Returns what `apply` returned.
    fn update(&self, scope: &str, apply: &mut StateUpdate<'_>) -> Result<bool, EngineError>;

    /// The scopes that hold state, sorted.
    fn scopes(&self) -> Result<Vec<String>, EngineError>;
}

/// The store key of an exposure scope under a group attribute; the attribute's length
/// prefix keeps keys unambiguous whatever characters the names hold.
pub fn scope_key(group_attribute: &str, exposure_scope: &str) -> String {
    let mut key = String::with_capacity(group_attribute.len() + 8 + exposure_scope.len());
    key.push_str(&group_attribute.len().to_string());
    key.push(':');
    key.push_str(group_attribute);
    key.push('/');
    key.push_str(exposure_scope);
    key
}

/// Default for [`InMemoryExposureStore::new`]: most scopes held.
pub const DEFAULT_MAX_EXPOSURE_SCOPES: usize = 100_000;

/// Amortized state in process memory: lost on restart. One lock per scope; a bounded
/// number of scopes (new scopes beyond the bound are refused with `ResourceExhausted`,
/// since scopes are named by clients).
pub struct InMemoryExposureStore {
    scopes: RwLock<HashMap<String, Arc<Mutex<AmortizedState>>>>,
    max_scopes: usize,
}

impl fmt::Debug for InMemoryExposureStore {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scopes = self
            .scopes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        formatter
            .debug_struct("InMemoryExposureStore")
            .field("scopes", &scopes)
            .field("max_scopes", &self.max_scopes)
            .finish()
    }
}

impl Default for InMemoryExposureStore {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EXPOSURE_SCOPES)
    }
}

impl InMemoryExposureStore {
    /// An empty store holding at most `max_scopes` scopes (at least 1).
    pub fn new(max_scopes: usize) -> Self {
        Self {
            scopes: RwLock::new(HashMap::new()),
            max_scopes: max_scopes.max(1),
        }
    }

    fn slot(&self, scope: &str) -> Result<Arc<Mutex<AmortizedState>>, EngineError> {
        if let Some(slot) = self
            .scopes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope)
        {
            return Ok(Arc::clone(slot));
        }
        let mut scopes = self.scopes.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = scopes.get(scope) {
            return Ok(Arc::clone(slot));
        }
        if scopes.len() >= self.max_scopes {
            return Err(EngineError::ResourceExhausted {
                message: format!(
                    "the amortized fairness state holds its limit of {} exposure scopes",
                    self.max_scopes
                ),
            });
        }
        let slot = Arc::new(Mutex::new(AmortizedState::default()));
        scopes.insert(scope.to_owned(), Arc::clone(&slot));
        Ok(slot)
    }
}

impl ExposureStateStore for InMemoryExposureStore {
    fn load(&self, scope: &str) -> Result<Option<AmortizedState>, EngineError> {
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        Ok(scopes
            .get(scope)
            .map(|slot| slot.lock().unwrap_or_else(PoisonError::into_inner).clone()))
    }

    fn update(&self, scope: &str, apply: &mut StateUpdate<'_>) -> Result<bool, EngineError> {
        let slot = self.slot(scope)?;
        let mut state = slot.lock().unwrap_or_else(PoisonError::into_inner);
        apply(&mut state)
    }

    fn scopes(&self) -> Result<Vec<String>, EngineError> {
        let scopes = self.scopes.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = scopes.keys().cloned().collect();
        names.sort_unstable();
        Ok(names)
    }
}

/// An [`ExposureStateStore`] over a `state` crate [`state::AmortizedStore`] (durable or in
/// memory). Updates of one scope are serialized in this process; the backing store receives
/// each answered ranking's additive delta (`state::delta_between`), so it never loses an
/// update to a read-modify-write race even if another process shared it.
pub struct AmortizedStoreAdapter {
    store: Arc<dyn state::AmortizedStore>,
    locks: RwLock<HashMap<String, Arc<Mutex<()>>>>,
    max_scopes: usize,
}

impl fmt::Debug for AmortizedStoreAdapter {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("AmortizedStoreAdapter")
            .field("store", &self.store)
            .field("max_scopes", &self.max_scopes)
            .finish_non_exhaustive()
    }
}

/// A `state` crate failure as an engine error (the state store cannot serve).
fn state_error(error: state::StateError) -> EngineError {
    EngineError::Unavailable {
        message: format!("the amortized fairness state store failed: {error}"),
    }
}

impl AmortizedStoreAdapter {
    /// Serves `store`, holding at most `max_scopes` scopes (at least 1).
    pub fn new(store: Arc<dyn state::AmortizedStore>, max_scopes: usize) -> Self {
        Self {
            store,
            locks: RwLock::new(HashMap::new()),
            max_scopes: max_scopes.max(1),
        }
    }

    /// The backing store (to flush or close it at shutdown).
    pub fn store(&self) -> &Arc<dyn state::AmortizedStore> {
        &self.store
    }

    fn lock_of(&self, scope: &str) -> Result<Arc<Mutex<()>>, EngineError> {
        if let Some(lock) = self
            .locks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope)
        {
            return Ok(Arc::clone(lock));
        }
        let mut locks = self.locks.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(lock) = locks.get(scope) {
            return Ok(Arc::clone(lock));
        }
        if locks.len() >= self.max_scopes {
            return Err(EngineError::ResourceExhausted {
                message: format!(
                    "the amortized fairness state holds its limit of {} exposure scopes",
                    self.max_scopes
                ),
            });
        }
        let lock = Arc::new(Mutex::new(()));
        locks.insert(scope.to_owned(), Arc::clone(&lock));
        Ok(lock)
    }
}

impl ExposureStateStore for AmortizedStoreAdapter {
    fn load(&self, scope: &str) -> Result<Option<AmortizedState>, EngineError> {
        let state = self.store.load(scope).map_err(state_error)?;
        let empty = state.rankings == 0
            && state.group_exposure.is_empty()
            && state.group_relevance.is_empty();
        Ok((!empty).then_some(state))
    }

    fn update(&self, scope: &str, apply: &mut StateUpdate<'_>) -> Result<bool, EngineError> {
        let lock = self.lock_of(scope)?;
        let _held = lock.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = self.store.load(scope).map_err(state_error)?;
        let before = state.clone();
        if !apply(&mut state)? {
            return Ok(false);
        }
        let delta = state::delta_between(&before, &state);
        self.store.update(scope, &delta).map_err(state_error)?;
        Ok(true)
    }

    fn scopes(&self) -> Result<Vec<String>, EngineError> {
        let locks = self.locks.read().unwrap_or_else(PoisonError::into_inner);
        let mut names: Vec<String> = locks.keys().cloned().collect();
        names.sort_unstable();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_persist_per_scope_and_unchanged_updates_are_not_counted() {
        let store = InMemoryExposureStore::new(4);
        assert_eq!(store.load("a/x").unwrap(), None);
        let changed = store
            .update("a/x", &mut |state: &mut AmortizedState| {
                state.group_exposure.insert(1, 2.0);
                state.rankings += 1;
                Ok(true)
            })
            .unwrap();
        assert!(changed);
        let state = store.load("a/x").unwrap().expect("stored");
        assert_eq!(state.group_exposure.get(&1), Some(&2.0));
        assert_eq!(state.rankings, 1);
        assert_eq!(store.load("a/y").unwrap(), None);
        let unchanged = store.update("a/y", &mut |_: &mut AmortizedState| Ok(false));
        assert_eq!(unchanged, Ok(false));
        assert_eq!(store.scopes().unwrap(), ["a/x", "a/y"]);
    }

    #[test]
    fn scopes_beyond_the_bound_are_refused() {
        let store = InMemoryExposureStore::new(1);
        assert!(
            store
                .update("a/1", &mut |_: &mut AmortizedState| Ok(true))
                .is_ok()
        );
        assert!(matches!(
            store.update("a/2", &mut |_: &mut AmortizedState| Ok(true)),
            Err(EngineError::ResourceExhausted { .. })
        ));
        // The existing scope keeps working.
        assert!(
            store
                .update("a/1", &mut |_: &mut AmortizedState| Ok(true))
                .is_ok()
        );
    }

    #[test]
    fn the_adapter_adds_each_update_to_the_backing_store() {
        let backing: Arc<dyn state::AmortizedStore> =
            Arc::new(state::InMemoryAmortizedStore::default());
        let adapter = AmortizedStoreAdapter::new(Arc::clone(&backing), 8);
        assert_eq!(adapter.load("1:a/x").unwrap(), None);
        for _ in 0..2 {
            adapter
                .update("1:a/x", &mut |state: &mut AmortizedState| {
                    *state.group_exposure.entry(3).or_insert(0.0) += 1.5;
                    *state.group_relevance.entry(3).or_insert(0.0) += 0.5;
                    state.rankings += 1;
                    Ok(true)
                })
                .unwrap();
        }
        let stored = backing.load("1:a/x").unwrap();
        assert_eq!(stored.rankings, 2);
        assert_eq!(stored.group_exposure.get(&3), Some(&3.0));
        assert_eq!(adapter.load("1:a/x").unwrap(), Some(stored));
        // An unchanged update writes nothing.
        adapter
            .update("1:a/y", &mut |_: &mut AmortizedState| Ok(false))
            .unwrap();
        assert_eq!(adapter.load("1:a/y").unwrap(), None);
    }

    #[test]
    fn scope_keys_separate_attributes() {
        assert_eq!(scope_key("provider_group", ""), "14:provider_group/");
        assert_ne!(scope_key("a", "b/c"), scope_key("a/b", "c"));
    }
}
