//! The `none` constraint: the unconstrained score order.

use crate::candidate::{Candidate, validate_pool};
use crate::error::FairnessError;
use crate::reranker::{AmortizedState, RerankOutput, Reranker};

/// Returns the top `k` of the pool in score order (the pool order).
#[derive(Debug, Clone, Copy, Default)]
pub struct ScoreOrder;

impl Reranker for ScoreOrder {
    fn name(&self) -> &str {
        "none"
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
        out.order.extend(0..k.min(pool.len()));
        Ok(())
    }
}
