//! Synthetic dataset generators and importers that produce fairrank table files.
//!
//! - [`generate`]: a deterministic synthetic catalog (ChaCha20 streams, bit-identical on every
//!   machine) with provider groups, a Zipf-like popularity prior and a latent bias that makes
//!   dot-product ranking under-expose minority groups, plus users and the *true* relevance
//!   behind the biased embeddings ([`SyntheticDataset::true_relevance`], [`true_relevance`]).
//!   The generative model is documented in the dataset card, `datasets/README.md`.
//! - [`default_dataset`]: the built-in default dataset, generated on first use into
//!   [`cache_dir`] under a name that encodes the generator version and parameters.
//! - [`read_npy`] / [`write_npy`]: strict NumPy `.npy` reader (float32/float64, C order, 2-D)
//!   and float32 writer; [`import_npy`]: embeddings plus an optional item metadata CSV as a
//!   [`store::TableData`].
//! - [`top_k_group_exposure`]: brute-force group exposure in top-k lists, by observed scores or
//!   by true relevance, to measure the bias.
//!
//! ```
//! use datasets::{Scoring, SyntheticParams, generate, top_k_group_exposure};
//!
//! # fn main() -> Result<(), datasets::DatasetError> {
//! let params = SyntheticParams { items: 500, dim: 8, users: 20, bias: 0.3, ..Default::default() };
//! let dataset = generate(&params)?;
//! assert_eq!(dataset.items.ids[0], "i0000000");
//! assert_eq!(dataset.users.ids[19], "u000019");
//! // Minority items look less relevant than they are: the observed score is shrunk.
//! let observed = dataset.observed_score(0, 1)?;
//! let truth = dataset.true_relevance(0, 1)?;
//! assert!(observed.is_finite() && truth.is_finite());
//! let exposure = top_k_group_exposure(&dataset, Scoring::Observed, 10, 0..20)?;
//! assert_eq!(exposure.len(), 2);
//! # Ok(())
//! # }
//! ```

mod cache;
mod error;
mod evaluation;
mod import;
mod npy;
mod portable_math;
mod progress;
mod random;
mod synthetic;

pub use cache::{
    CACHE_ENV_VAR, DefaultDataset, TABLE_EXTENSION, cache_dir, cached_dataset, dataset_paths,
    default_dataset,
};
pub use error::{CsvProblem, DatasetError, NpyProblem};
pub use evaluation::{Scoring, position_weight, top_k_group_exposure};
pub use import::{ID_COLUMN, ItemMetadata, PRIOR_COLUMN, import_npy, read_item_metadata};
pub use npy::{NpyMatrix, read_npy, read_npy_bytes, write_npy};
pub use synthetic::{
    GENERATOR_VERSION, GROUP_ATTRIBUTE, MAJORITY_GROUP, MAX_DIM, MAX_OBSERVATION_NOISE,
    MAX_POPULARITY_EXPONENT, MAX_ROWS, SyntheticDataset, SyntheticParams, generate,
    generate_with_progress, true_item_vector, true_relevance, user_vector,
};
