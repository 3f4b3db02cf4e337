//! Amortized fairness state (FairCo, Morik et al. 2020): cumulative exposure and cumulative
//! relevance per group label, kept per exposure scope, with an in-memory store.
//!
//! The state type is the fairness crate's [`AmortizedState`]. Stores are *additive*:
//! [`AmortizedStore::update`] adds a delta, so concurrent requests on one scope each add
//! their own ranking's exposure and relevance and nothing is lost to a read-modify-write
//! race. With the FairCo re-ranker, take the delta between the state it was given and the
//! state it returned with [`delta_between`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;

use fairness::AmortizedState;

use crate::error::StateError;

/// The longest accepted exposure scope name, in bytes.
pub const MAX_SCOPE_BYTES: usize = 1024;

/// A store of amortized fairness state per exposure scope.
///
/// Object-safe and shareable (`Arc<dyn AmortizedStore>`).
pub trait AmortizedStore: Send + Sync + fmt::Debug {
    /// Copies the state of `scope` into `out` (empty state for an unknown scope), reusing
    /// `out`'s allocations.
    fn load_into(&self, scope: &str, out: &mut AmortizedState) -> Result<(), StateError>;

    /// Adds `delta` (finite, non-negative totals and a ranking count) to the state of `scope`.
    fn update(&self, scope: &str, delta: &AmortizedState) -> Result<(), StateError>;

    /// Makes every update so far durable (no-op for in-memory stores).
    fn flush(&self) -> Result<(), StateError>;

    /// Flushes and releases the store; later calls fail with [`StateError::Closed`]. Closing
    /// twice is not an error.
    fn close(&self) -> Result<(), StateError>;

    /// The state of `scope` (empty for an unknown scope).
    fn load(&self, scope: &str) -> Result<AmortizedState, StateError> {
        let mut state = AmortizedState::default();
        self.load_into(scope, &mut state)?;
        Ok(state)
    }
}

/// `after - before` per group and for the ranking count, clamped at zero (totals only grow;
/// the clamp absorbs floating-point cancellation). Groups absent from `before` count as 0.
pub fn delta_between(before: &AmortizedState, after: &AmortizedState) -> AmortizedState {
    let difference = |before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>| {
        after
            .iter()
            .map(|(group, &value)| {
                let old = before.get(group).copied().unwrap_or(0.0);
                (*group, (value - old).max(0.0))
            })
            .collect()
    };
    AmortizedState {
        group_exposure: difference(&before.group_exposure, &after.group_exposure),
        group_relevance: difference(&before.group_relevance, &after.group_relevance),
        rankings: after.rankings.saturating_sub(before.rankings),
    }
}

/// Checks a scope name.
pub(crate) fn check_scope(scope: &str) -> Result<(), StateError> {
    if scope.is_empty() || scope.len() > MAX_SCOPE_BYTES {
        return Err(StateError::InvalidArgument {
            field: "scope",
            reason: format!(
                "must have 1 to {MAX_SCOPE_BYTES} bytes, has {}",
                scope.len()
            ),
        });
    }
    Ok(())
}

/// Checks a delta (finite, non-negative).
pub(crate) fn check_delta(delta: &AmortizedState) -> Result<(), StateError> {
    delta
        .validate()
        .map_err(|error| StateError::InvalidArgument {
            field: "delta",
            reason: error.to_string(),
        })
}

/// Adds `delta` to `state` (after [`check_delta`]).
pub(crate) fn add_delta(state: &mut AmortizedState, delta: &AmortizedState) {
    for (group, value) in &delta.group_exposure {
        *state.group_exposure.entry(*group).or_insert(0.0) += value;
    }
    for (group, value) in &delta.group_relevance {
        *state.group_relevance.entry(*group).or_insert(0.0) += value;
    }
    state.rankings = state.rankings.saturating_add(delta.rankings);
}

/// Binary layout: ranking count (u64), then exposure and relevance as
/// `count (u32), count x (label u32, value f64)`, all little-endian. Exact for every `f64`.
pub(crate) fn encode_state(state: &AmortizedState, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&state.rankings.to_le_bytes());
    for map in [&state.group_exposure, &state.group_relevance] {
        // Group labels are u32, so a map never has more than u32::MAX + 1 entries; saturate.
        let count = u32::try_from(map.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        for (group, value) in map.iter().take(count as usize) {
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// The inverse of [`encode_state`]; an error message for malformed bytes.
pub(crate) fn decode_state(bytes: &[u8]) -> Result<AmortizedState, String> {
    let mut rest = bytes;
    let mut take = |length: usize| -> Result<&[u8], String> {
        let (head, tail) = rest.split_at_checked(length).ok_or_else(|| {
            format!(
                "truncated at {} of {} bytes",
                bytes.len() - rest.len(),
                bytes.len()
            )
        })?;
        rest = tail;
        Ok(head)
    };
    let array8 = |slice: &[u8]| -> [u8; 8] { slice.try_into().unwrap_or([0; 8]) };
    let array4 = |slice: &[u8]| -> [u8; 4] { slice.try_into().unwrap_or([0; 4]) };
    let rankings = u64::from_le_bytes(array8(take(8)?));
    let mut maps = [BTreeMap::new(), BTreeMap::new()];
    for map in &mut maps {
        let count = u32::from_le_bytes(array4(take(4)?));
        for _ in 0..count {
            let group = u32::from_le_bytes(array4(take(4)?));
            let value = f64::from_le_bytes(array8(take(8)?));
            map.insert(group, value);
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    let [group_exposure, group_relevance] = maps;
    let state = AmortizedState {
        group_exposure,
        group_relevance,
        rankings,
    };
    state.validate().map_err(|error| error.to_string())?;
    Ok(state)
}

/// An [`AmortizedStore`] in process memory (lost on exit).
#[derive(Debug)]
pub struct InMemoryAmortizedStore {
    scopes: Mutex<Option<HashMap<String, AmortizedState>>>,
}

impl InMemoryAmortizedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            scopes: Mutex::new(Some(HashMap::new())),
        }
    }
}

impl Default for InMemoryAmortizedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl AmortizedStore for InMemoryAmortizedStore {
    fn load_into(&self, scope: &str, out: &mut AmortizedState) -> Result<(), StateError> {
        check_scope(scope)?;
        let guard = self.scopes.lock().map_err(|_| StateError::WriterStopped)?;
        let scopes = guard.as_ref().ok_or(StateError::Closed)?;
        match scopes.get(scope) {
            Some(state) => out.clone_from(state),
            None => {
                out.group_exposure.clear();
                out.group_relevance.clear();
                out.rankings = 0;
            }
        }
        Ok(())
    }

    fn update(&self, scope: &str, delta: &AmortizedState) -> Result<(), StateError> {
        check_scope(scope)?;
        check_delta(delta)?;
        let mut guard = self.scopes.lock().map_err(|_| StateError::WriterStopped)?;
        let scopes = guard.as_mut().ok_or(StateError::Closed)?;
        add_delta(scopes.entry(scope.to_string()).or_default(), delta);
        Ok(())
    }

    fn flush(&self) -> Result<(), StateError> {
        let guard = self.scopes.lock().map_err(|_| StateError::WriterStopped)?;
        guard.as_ref().map(|_| ()).ok_or(StateError::Closed)
    }

    fn close(&self) -> Result<(), StateError> {
        self.scopes
            .lock()
            .map_err(|_| StateError::WriterStopped)?
            .take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(
        exposure: &[(u32, f64)],
        relevance: &[(u32, f64)],
        rankings: u64,
    ) -> AmortizedState {
        AmortizedState {
            group_exposure: exposure.iter().copied().collect(),
            group_relevance: relevance.iter().copied().collect(),
            rankings,
        }
    }

    #[test]
    fn encoding_round_trips_exactly_and_rejects_damage() {
        let state = sample(&[(0, 0.1 + 0.2), (7, 1e-300)], &[(0, 3.5)], 42);
        let mut bytes = Vec::new();
        encode_state(&state, &mut bytes);
        assert_eq!(decode_state(&bytes).unwrap(), state);
        assert!(decode_state(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_state(&longer).is_err());
        let negative = sample(&[(0, -1.0)], &[], 0);
        encode_state(&negative, &mut bytes);
        assert!(decode_state(&bytes).is_err());
    }

    #[test]
    fn delta_between_inverts_adding_a_delta() {
        let before = sample(&[(0, 1.0), (1, 2.0)], &[(0, 0.5)], 3);
        let delta = sample(&[(0, 0.25), (2, 1.5)], &[(0, 0.5), (1, 0.125)], 2);
        let mut after = before.clone();
        add_delta(&mut after, &delta);
        let recovered = delta_between(&before, &after);
        assert_eq!(recovered.rankings, 2);
        assert_eq!(recovered.group_exposure.get(&0), Some(&0.25));
        assert_eq!(recovered.group_exposure.get(&1), Some(&0.0));
        assert_eq!(recovered.group_exposure.get(&2), Some(&1.5));
        assert_eq!(recovered.group_relevance.get(&1), Some(&0.125));
    }

    #[test]
    fn in_memory_store_adds_deltas_per_scope_and_validates() {
        let store = InMemoryAmortizedStore::new();
        assert_eq!(store.load("a").unwrap(), AmortizedState::default());
        store
            .update("a", &sample(&[(0, 1.0)], &[(0, 2.0)], 1))
            .unwrap();
        store
            .update("a", &sample(&[(0, 0.5), (1, 1.0)], &[], 1))
            .unwrap();
        store.update("b", &sample(&[(3, 9.0)], &[], 1)).unwrap();
        assert_eq!(
            store.load("a").unwrap(),
            sample(&[(0, 1.5), (1, 1.0)], &[(0, 2.0)], 2)
        );
        assert_eq!(store.load("b").unwrap(), sample(&[(3, 9.0)], &[], 1));
        let bad = store
            .update("a", &sample(&[(0, f64::NAN)], &[], 0))
            .unwrap_err();
        assert!(matches!(
            bad,
            StateError::InvalidArgument { field: "delta", .. }
        ));
        let bad = store.update("", &AmortizedState::default()).unwrap_err();
        assert!(matches!(
            bad,
            StateError::InvalidArgument { field: "scope", .. }
        ));
        store.close().unwrap();
        assert_eq!(store.load("a").unwrap_err(), StateError::Closed);
    }
}
