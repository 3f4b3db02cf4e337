//! The deterministic synthetic generator: items in provider groups with a power-law popularity
//! prior, users, and a latent bias that makes dot-product ranking under-expose minority groups,
//! together with the true relevance behind the biased embeddings (see `datasets/README.md`).

use store::{GroupAttribute, TableData};

use crate::error::DatasetError;
use crate::portable_math;
use crate::progress;
use crate::random::{self, StreamPurpose};

/// Version of the generative model and its random streams. Bump it whenever a change to this
/// file changes any generated value, so cached files of the old generator are never served.
pub const GENERATOR_VERSION: u32 = 1;

/// Name of the group attribute of synthetic items.
pub const GROUP_ATTRIBUTE: &str = "provider_group";

/// Label of the majority group; minority groups are labelled `1..groups`.
pub const MAJORITY_GROUP: u32 = 0;

/// Largest number of items or users (row indices must fit in `u32`).
pub const MAX_ROWS: usize = u32::MAX as usize;

/// Largest embedding dimension the generator accepts.
pub const MAX_DIM: usize = 65_536;

/// Largest accepted popularity exponent (far beyond any real catalog: at 10 the top item already
/// holds 99.9% of the prior mass).
pub const MAX_POPULARITY_EXPONENT: f64 = 10.0;

/// Largest accepted observation noise (relative to the unit norm of true latent vectors).
pub const MAX_OBSERVATION_NOISE: f64 = 10.0;

/// Number of rows above which generation shows a progress bar (rows x dim values).
const PROGRESS_THRESHOLD_VALUES: usize = 4_000_000;

/// Parameters of the synthetic generator; [`Default`] gives the built-in default dataset.
///
/// The generative model (formulas) is documented in `datasets/README.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticParams {
    /// Number of items `N` (rows of the item table).
    pub items: usize,
    /// Embedding dimension `D` of items and users.
    pub dim: usize,
    /// Number of users `M` (rows of the user table).
    pub users: usize,
    /// Number of provider groups `G` (labels `0..G` of attribute `provider_group`; 0 is the
    /// majority group).
    pub groups: usize,
    /// Share `s` of items in the minority groups `1..G` together, split evenly between them; the
    /// majority group 0 holds `1 - s`. Must be 0 when `groups == 1`, else strictly in (0, 1).
    pub minority_share: f64,
    /// Exponent `alpha` of the Zipf-like popularity prior: the item of popularity rank `r` has
    /// prior proportional to `r^-alpha` (0 gives a uniform prior).
    pub popularity_exponent: f64,
    /// Latent bias `beta` in [0, 1): observed embeddings of minority items are the true latent
    /// vectors shrunk by the factor `1 - beta`. 0 turns the bias off.
    pub bias: f64,
    /// Standard deviation `sigma` of the isotropic noise added to every observed item embedding,
    /// relative to the unit expected norm of the latent vectors. 0 makes embeddings exact.
    pub observation_noise: f64,
    /// Seed of the ChaCha20 streams; the same parameters give the same bits on every machine.
    pub seed: u64,
}

impl Default for SyntheticParams {
    /// The built-in default dataset: 100k items x 64 dims, 2 groups with a 20% minority,
    /// Zipf exponent 1, bias 0.1, noise 0.1, 10k users, seed 42.
    fn default() -> Self {
        Self {
            items: 100_000,
            dim: 64,
            users: 10_000,
            groups: 2,
            minority_share: 0.2,
            popularity_exponent: 1.0,
            bias: 0.1,
            observation_noise: 0.1,
            seed: 42,
        }
    }
}

impl SyntheticParams {
    /// Checks every parameter; the error names the offending field.
    pub fn validate(&self) -> Result<(), DatasetError> {
        if self.items == 0 || self.items > MAX_ROWS {
            return Err(DatasetError::invalid(
                "items",
                format!("{} is not in 1..={MAX_ROWS}", self.items),
            ));
        }
        if self.users == 0 || self.users > MAX_ROWS {
            return Err(DatasetError::invalid(
                "users",
                format!("{} is not in 1..={MAX_ROWS}", self.users),
            ));
        }
        if self.dim == 0 || self.dim > MAX_DIM {
            return Err(DatasetError::invalid(
                "dim",
                format!("{} is not in 1..={MAX_DIM}", self.dim),
            ));
        }
        if self.groups == 0 || self.groups > self.items {
            return Err(DatasetError::invalid(
                "groups",
                format!("{} is not in 1..=items ({})", self.groups, self.items),
            ));
        }
        let share = self.minority_share;
        if self.groups == 1 && share != 0.0 {
            return Err(DatasetError::invalid(
                "minority_share",
                format!("{share} must be 0 with a single group"),
            ));
        }
        if self.groups > 1 && !(share > 0.0 && share < 1.0) {
            return Err(DatasetError::invalid(
                "minority_share",
                format!("{share} is not strictly between 0 and 1"),
            ));
        }
        let exponent = self.popularity_exponent;
        if !(0.0..=MAX_POPULARITY_EXPONENT).contains(&exponent) {
            return Err(DatasetError::invalid(
                "popularity_exponent",
                format!("{exponent} is not in [0, {MAX_POPULARITY_EXPONENT}]"),
            ));
        }
        if !(0.0..1.0).contains(&self.bias) {
            return Err(DatasetError::invalid(
                "bias",
                format!("{} is not in [0, 1)", self.bias),
            ));
        }
        let noise = self.observation_noise;
        if !(0.0..=MAX_OBSERVATION_NOISE).contains(&noise) {
            return Err(DatasetError::invalid(
                "observation_noise",
                format!("{noise} is not in [0, {MAX_OBSERVATION_NOISE}]"),
            ));
        }
        self.group_counts().map(|_| ())
    }

    /// Intended share of items per group: `1 - s` for group 0, `s / (G - 1)` for each other group.
    pub fn group_shares(&self) -> Vec<f64> {
        if self.groups <= 1 {
            return vec![1.0; self.groups];
        }
        let minority = self.minority_share / (self.groups - 1) as f64;
        let mut shares = vec![minority; self.groups];
        shares[0] = 1.0 - self.minority_share;
        shares
    }

    /// Exact number of items per group: `N` times each share, rounded by the largest-remainder
    /// method (ties to the lower group label), so counts always sum to `N`.
    ///
    /// Fails if a group would be empty.
    pub fn group_counts(&self) -> Result<Vec<usize>, DatasetError> {
        let shares = self.group_shares();
        let ideal: Vec<f64> = shares
            .iter()
            .map(|share| share * self.items as f64)
            .collect();
        let mut counts: Vec<usize> = ideal.iter().map(|value| value.floor() as usize).collect();
        let assigned: usize = counts.iter().sum();
        let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
        by_remainder.sort_by(|&a, &b| {
            let remainder_a = ideal[a] - ideal[a].floor();
            let remainder_b = ideal[b] - ideal[b].floor();
            remainder_b.total_cmp(&remainder_a).then(a.cmp(&b))
        });
        let missing = self.items.saturating_sub(assigned);
        for &group in by_remainder.iter().cycle().take(missing) {
            counts[group] += 1;
        }
        if let Some(empty) = counts.iter().position(|&count| count == 0) {
            return Err(DatasetError::invalid(
                "minority_share",
                format!(
                    "group {empty} would get no items ({} items, {} groups, minority share {})",
                    self.items, self.groups, self.minority_share
                ),
            ));
        }
        Ok(counts)
    }

    /// The factor `f_g` applied to true latent vectors of group `group` in observed embeddings:
    /// 1 for the majority group, `1 - bias` for every minority group.
    pub fn embedding_scale(&self, group: u32) -> f64 {
        if group == MAJORITY_GROUP {
            1.0
        } else {
            1.0 - self.bias
        }
    }

    /// A 64-bit FNV-1a hash of the parameters and [`GENERATOR_VERSION`], used to name cache files.
    pub fn fingerprint(&self) -> u64 {
        let mut hash = Fnv1a::new();
        hash.write(b"fairrank-synthetic");
        hash.write(&GENERATOR_VERSION.to_le_bytes());
        for count in [self.items, self.dim, self.users, self.groups] {
            hash.write(&(count as u64).to_le_bytes());
        }
        for value in [
            self.minority_share,
            self.popularity_exponent,
            self.bias,
            self.observation_noise,
        ] {
            // +0.0 and -0.0 generate the same data, so they hash the same.
            let canonical = if value == 0.0 { 0.0_f64 } else { value };
            hash.write(&canonical.to_bits().to_le_bytes());
        }
        hash.write(&self.seed.to_le_bytes());
        hash.finish()
    }

    fn inverse_sqrt_dim(&self) -> f64 {
        1.0 / (self.dim as f64).sqrt()
    }
}

/// 64-bit FNV-1a, a tiny stable hash (the standard library's hasher is not stable across releases).
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A generated dataset: the item and user tables plus the true latent item vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticDataset {
    /// The parameters it was generated from.
    pub params: SyntheticParams,
    /// Item table: observed (possibly biased) embeddings, ids `i0000000`..., the
    /// `provider_group` attribute and the normalized popularity prior.
    pub items: TableData,
    /// User table: user vectors, ids `u000000`..., no groups, no prior.
    pub users: TableData,
    /// True latent item vectors `t_i`, row-major (`items * dim` values), the ground truth of
    /// relevance: `rel(u, i) = <x_u, t_i>`.
    pub true_item_vectors: Vec<f32>,
}

impl SyntheticDataset {
    /// Group label of every item (`provider_group`), in row order.
    pub fn item_groups(&self) -> &[u32] {
        self.items
            .groups
            .iter()
            .find(|attribute| attribute.name == GROUP_ATTRIBUTE)
            .map_or(&[], |attribute| attribute.labels.as_slice())
    }

    /// True latent vector `t_i` of item `item`.
    pub fn true_item_vector(&self, item: usize) -> Result<&[f32], DatasetError> {
        row_of(&self.true_item_vectors, self.params.dim, item, "item")
    }

    /// Observed (stored) embedding `e_i` of item `item`.
    pub fn item_vector(&self, item: usize) -> Result<&[f32], DatasetError> {
        row_of(&self.items.rows, self.params.dim, item, "item")
    }

    /// Vector `x_u` of user `user`.
    pub fn user_vector(&self, user: usize) -> Result<&[f32], DatasetError> {
        row_of(&self.users.rows, self.params.dim, user, "user")
    }

    /// True relevance `<x_u, t_i>` of item `item` to user `user` (accumulated in f64).
    pub fn true_relevance(&self, user: usize, item: usize) -> Result<f32, DatasetError> {
        Ok(dot(self.user_vector(user)?, self.true_item_vector(item)?))
    }

    /// Score `<x_u, e_i>` an unconstrained dot-product ranker sees (accumulated in f64).
    pub fn observed_score(&self, user: usize, item: usize) -> Result<f32, DatasetError> {
        Ok(dot(self.user_vector(user)?, self.item_vector(item)?))
    }

    /// The item table with the true latent vectors instead of the observed embeddings (same ids,
    /// groups and prior), for evaluation tools that read tables.
    pub fn true_item_table(&self) -> TableData {
        TableData {
            rows: self.true_item_vectors.clone(),
            ..self.items.clone()
        }
    }
}

fn row_of<'a>(
    rows: &'a [f32],
    dim: usize,
    index: usize,
    what: &'static str,
) -> Result<&'a [f32], DatasetError> {
    let len = rows.len() / dim.max(1);
    if index >= len {
        return Err(DatasetError::IndexOutOfRange { what, index, len });
    }
    Ok(&rows[index * dim..(index + 1) * dim])
}

/// Dot product accumulated in f64 and rounded once to f32.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum::<f64>() as f32
}

/// Generates the dataset described by `params` (silently).
pub fn generate(params: &SyntheticParams) -> Result<SyntheticDataset, DatasetError> {
    generate_inner(params, false)
}

/// Like [`generate`], showing a progress bar on stderr for large datasets.
pub fn generate_with_progress(params: &SyntheticParams) -> Result<SyntheticDataset, DatasetError> {
    let values = (params.items.saturating_add(params.users)).saturating_mul(params.dim);
    generate_inner(params, values >= PROGRESS_THRESHOLD_VALUES)
}

fn generate_inner(
    params: &SyntheticParams,
    show_progress: bool,
) -> Result<SyntheticDataset, DatasetError> {
    params.validate()?;
    let counts = params.group_counts()?;
    let dim = params.dim;
    let labels = assign_groups(params, &counts);
    let prior = popularity_prior(params);

    let item_values = checked_values(params.items, dim, "items")?;
    let user_values = checked_values(params.users, dim, "users")?;
    let mut true_item_vectors = allocate(item_values, "items")?;
    let mut observed = allocate(item_values, "items")?;
    let mut user_rows = allocate(user_values, "users")?;

    let bar = progress::bar(
        (params.items + params.users) as u64,
        "generating synthetic data",
        show_progress,
    );
    let mut noise = vec![0.0_f32; dim];
    let rows = true_item_vectors
        .chunks_exact_mut(dim)
        .zip(observed.chunks_exact_mut(dim))
        .zip(&labels);
    for (item, ((true_row, observed_row), &label)) in rows.enumerate() {
        fill_true_item_vector(params, item, true_row);
        let scale = params.embedding_scale(label);
        if params.observation_noise > 0.0 {
            let mut rng = random::stream(params.seed, StreamPurpose::ItemNoise, item as u64);
            random::fill_normal(
                &mut rng,
                params.observation_noise * params.inverse_sqrt_dim(),
                &mut noise,
            );
        }
        for ((value, &latent), &noise) in observed_row.iter_mut().zip(true_row.iter()).zip(&noise) {
            *value = (scale * f64::from(latent) + f64::from(noise)) as f32;
        }
        if item % 4096 == 4095 {
            bar.inc(4096);
        }
    }
    bar.set_position(params.items as u64);
    for (user, row) in user_rows.chunks_exact_mut(dim).enumerate() {
        fill_user_vector(params, user, row);
        if user % 4096 == 4095 {
            bar.inc(4096);
        }
    }
    bar.finish_and_clear();

    let items = TableData {
        dim,
        rows: observed,
        ids: (0..params.items)
            .map(|item| format!("i{item:07}"))
            .collect(),
        groups: vec![GroupAttribute {
            name: GROUP_ATTRIBUTE.to_string(),
            labels,
        }],
        prior: Some(prior),
        dim_names: None,
    };
    let users = TableData {
        dim,
        rows: user_rows,
        ids: (0..params.users)
            .map(|user| format!("u{user:06}"))
            .collect(),
        groups: Vec::new(),
        prior: None,
        dim_names: None,
    };
    Ok(SyntheticDataset {
        params: params.clone(),
        items,
        users,
        true_item_vectors,
    })
}

fn checked_values(rows: usize, dim: usize, name: &'static str) -> Result<usize, DatasetError> {
    rows.checked_mul(dim)
        .filter(|values| values.checked_mul(4).is_some())
        .ok_or_else(|| {
            DatasetError::invalid(name, format!("{rows} rows x {dim} dims is too large"))
        })
}

fn allocate(values: usize, name: &'static str) -> Result<Vec<f32>, DatasetError> {
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(values).map_err(|_| {
        DatasetError::invalid(name, format!("cannot allocate {values} float32 values"))
    })?;
    buffer.resize(values, 0.0);
    Ok(buffer)
}

/// Group labels: exactly `counts[g]` items get label `g`, at positions of a seeded permutation.
fn assign_groups(params: &SyntheticParams, counts: &[usize]) -> Vec<u32> {
    let mut labels = Vec::with_capacity(params.items);
    for (group, &count) in counts.iter().enumerate() {
        labels.extend(std::iter::repeat_n(group as u32, count));
    }
    let mut rng = random::stream(params.seed, StreamPurpose::GroupShuffle, 0);
    random::shuffle(&mut rng, &mut labels);
    labels
}

/// The Zipf-like prior: item `i` has popularity rank `r_i` (a seeded permutation of `1..=N`,
/// independent of groups) and prior `r_i^-alpha / sum_r r^-alpha`.
fn popularity_prior(params: &SyntheticParams) -> Vec<f32> {
    let weights: Vec<f64> = (1..=params.items)
        .map(|rank| portable_math::pow(rank as f64, -params.popularity_exponent))
        .collect();
    // Smallest terms first, in a fixed order, for an accurate and reproducible total.
    let total: f64 = weights.iter().rev().sum();
    let mut ranks: Vec<u32> = (0..params.items as u32).collect();
    let mut rng = random::stream(params.seed, StreamPurpose::PopularityShuffle, 0);
    random::shuffle(&mut rng, &mut ranks);
    ranks
        .iter()
        .map(|&rank| (weights[rank as usize] / total) as f32)
        .collect()
}

fn fill_true_item_vector(params: &SyntheticParams, item: usize, out: &mut [f32]) {
    let mut rng = random::stream(params.seed, StreamPurpose::ItemLatent, item as u64);
    random::fill_normal(&mut rng, params.inverse_sqrt_dim(), out);
}

fn fill_user_vector(params: &SyntheticParams, user: usize, out: &mut [f32]) {
    let mut rng = random::stream(params.seed, StreamPurpose::UserVector, user as u64);
    random::fill_normal(&mut rng, params.inverse_sqrt_dim(), out);
}

fn check_index(index: usize, len: usize, what: &'static str) -> Result<(), DatasetError> {
    if index >= len {
        return Err(DatasetError::IndexOutOfRange { what, index, len });
    }
    Ok(())
}

fn check_buffer(out: &[f32], dim: usize) -> Result<(), DatasetError> {
    if out.len() != dim {
        return Err(DatasetError::invalid(
            "dim",
            format!(
                "output buffer holds {} values, expected dim = {dim}",
                out.len()
            ),
        ));
    }
    Ok(())
}

/// Writes the true latent vector `t_i` of item `item` into `out` (`dim` values) without
/// generating the dataset: each row has its own random stream, so this costs O(dim).
pub fn true_item_vector(
    params: &SyntheticParams,
    item: usize,
    out: &mut [f32],
) -> Result<(), DatasetError> {
    params.validate()?;
    check_index(item, params.items, "item")?;
    check_buffer(out, params.dim)?;
    fill_true_item_vector(params, item, out);
    Ok(())
}

/// Writes the vector `x_u` of user `user` into `out` (`dim` values) in O(dim).
pub fn user_vector(
    params: &SyntheticParams,
    user: usize,
    out: &mut [f32],
) -> Result<(), DatasetError> {
    params.validate()?;
    check_index(user, params.users, "user")?;
    check_buffer(out, params.dim)?;
    fill_user_vector(params, user, out);
    Ok(())
}

/// True relevance `<x_u, t_i>` of item `item` to user `user`, computed in O(dim) from the
/// parameters alone; equal to [`SyntheticDataset::true_relevance`] of the generated dataset.
pub fn true_relevance(
    params: &SyntheticParams,
    user: usize,
    item: usize,
) -> Result<f32, DatasetError> {
    params.validate()?;
    let mut user_row = vec![0.0; params.dim];
    let mut item_row = vec![0.0; params.dim];
    user_vector(params, user, &mut user_row)?;
    true_item_vector(params, item, &mut item_row)?;
    Ok(dot(&user_row, &item_row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluation::{Scoring, top_k_group_exposure};

    fn small(seed: u64) -> SyntheticParams {
        SyntheticParams {
            items: 2_000,
            dim: 16,
            users: 300,
            seed,
            ..SyntheticParams::default()
        }
    }

    #[test]
    fn same_seed_gives_identical_data_and_other_seeds_differ() {
        let first = generate(&small(1)).unwrap();
        let again = generate(&small(1)).unwrap();
        assert_eq!(first, again);
        let other = generate(&small(2)).unwrap();
        assert_ne!(first.items.rows, other.items.rows);
        assert_ne!(first.users.rows, other.users.rows);
        assert_ne!(first.true_item_vectors, other.true_item_vectors);
        assert_ne!(first.item_groups(), other.item_groups());
        assert_ne!(first.items.prior, other.items.prior);
    }

    #[test]
    fn tables_have_the_documented_layout() {
        let params = small(3);
        let dataset = generate(&params).unwrap();
        let items = &dataset.items;
        assert_eq!(items.dim, 16);
        assert_eq!(items.rows.len(), 2_000 * 16);
        assert_eq!(items.ids.len(), 2_000);
        assert_eq!(items.ids[0], "i0000000");
        assert_eq!(items.ids[1_999], "i0001999");
        assert_eq!(items.groups.len(), 1);
        assert_eq!(items.groups[0].name, GROUP_ATTRIBUTE);
        assert_eq!(items.groups[0].labels.len(), 2_000);
        let users = &dataset.users;
        assert_eq!(users.rows.len(), 300 * 16);
        assert_eq!(users.ids[0], "u000000");
        assert_eq!(users.ids[299], "u000299");
        assert!(users.groups.is_empty());
        assert!(users.prior.is_none());
        assert!(items.rows.iter().chain(&users.rows).all(|v| v.is_finite()));
    }

    #[test]
    fn group_counts_follow_the_shares_exactly() {
        let dataset = generate(&small(4)).unwrap();
        let minority = dataset.item_groups().iter().filter(|&&g| g == 1).count();
        assert_eq!(minority, 400);
        assert!(dataset.item_groups().iter().all(|&g| g < 2));
        // Minority items are spread over the catalog, not clustered at one end.
        let first_half = dataset.item_groups()[..1_000]
            .iter()
            .filter(|&&g| g == 1)
            .count();
        assert!((150..250).contains(&first_half), "{first_half}");

        let three = SyntheticParams {
            items: 1_001,
            groups: 4,
            minority_share: 0.3,
            ..small(4)
        };
        let counts = three.group_counts().unwrap();
        assert_eq!(counts.iter().sum::<usize>(), 1_001);
        // 700.7 for the majority, 100.1 for each of three minority groups.
        assert_eq!(counts, vec![701, 100, 100, 100]);
        let dataset = generate(&three).unwrap();
        for (group, &count) in counts.iter().enumerate() {
            let found = dataset
                .item_groups()
                .iter()
                .filter(|&&g| g as usize == group)
                .count();
            assert_eq!(found, count);
        }
    }

    #[test]
    fn a_single_group_needs_no_minority_share() {
        let single = SyntheticParams {
            groups: 1,
            minority_share: 0.0,
            ..small(5)
        };
        let dataset = generate(&single).unwrap();
        assert!(dataset.item_groups().iter().all(|&g| g == MAJORITY_GROUP));
    }

    #[test]
    fn prior_is_a_normalized_power_law() {
        let params = SyntheticParams {
            popularity_exponent: 1.2,
            ..small(6)
        };
        let dataset = generate(&params).unwrap();
        let prior = dataset.items.prior.clone().unwrap();
        let total: f64 = prior.iter().map(|&p| f64::from(p)).sum();
        assert!((total - 1.0).abs() < 1e-5, "sum {total}");
        assert!(prior.iter().all(|&p| p > 0.0));
        let mut sorted = prior.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        // Least-squares slope of log(prior) against log(rank) recovers -alpha.
        let points: Vec<(f64, f64)> = sorted
            .iter()
            .enumerate()
            .map(|(index, &p)| (((index + 1) as f64).ln(), f64::from(p).ln()))
            .collect();
        let n = points.len() as f64;
        let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
        let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
        let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        let slope = covariance / variance;
        assert!((slope + 1.2).abs() < 1e-3, "slope {slope}");
        let ratio = f64::from(sorted[0]) / f64::from(sorted[1_999]);
        let expected = 2_000_f64.powf(1.2);
        assert!((ratio / expected - 1.0).abs() < 1e-4, "ratio {ratio}");
        // Popularity is independent of the group: the minority holds about its share of it.
        let minority_mass: f64 = prior
            .iter()
            .zip(dataset.item_groups())
            .filter(|(_, g)| **g == 1)
            .map(|(&p, _)| f64::from(p))
            .sum();
        assert!((0.08..0.35).contains(&minority_mass), "{minority_mass}");
    }

    #[test]
    fn zero_exponent_gives_a_uniform_prior() {
        let params = SyntheticParams {
            popularity_exponent: 0.0,
            ..small(7)
        };
        let prior = generate(&params).unwrap().items.prior.unwrap();
        assert!(prior.iter().all(|&p| (p - 1.0 / 2_000.0).abs() < 1e-9));
    }

    #[test]
    fn latent_vectors_have_unit_expected_norm() {
        let dataset = generate(&small(8)).unwrap();
        let mean_squared_norm = |rows: &[f32]| {
            let count = rows.len() / 16;
            rows.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / count as f64
        };
        let users = mean_squared_norm(&dataset.users.rows);
        let items = mean_squared_norm(&dataset.true_item_vectors);
        assert!((users - 1.0).abs() < 0.05, "{users}");
        assert!((items - 1.0).abs() < 0.05, "{items}");
    }

    #[test]
    fn bias_shrinks_minority_embeddings_only() {
        let params = SyntheticParams {
            bias: 0.4,
            observation_noise: 0.0,
            ..small(9)
        };
        let dataset = generate(&params).unwrap();
        for (item, &group) in dataset.item_groups().iter().enumerate() {
            let truth = dataset.true_item_vector(item).unwrap();
            let observed = dataset.item_vector(item).unwrap();
            let scale = if group == MAJORITY_GROUP { 1.0 } else { 0.6 };
            for (&o, &t) in observed.iter().zip(truth) {
                assert_eq!(o, (scale * f64::from(t)) as f32);
            }
        }
        // Scores of minority items are the true relevance shrunk by 1 - bias.
        let minority = dataset.item_groups().iter().position(|&g| g == 1).unwrap();
        let observed = dataset.observed_score(0, minority).unwrap();
        let truth = dataset.true_relevance(0, minority).unwrap();
        assert!((observed - 0.6 * truth).abs() < 1e-6);
    }

    #[test]
    fn changing_bias_or_noise_keeps_everything_else() {
        let base = small(10);
        let unbiased = generate(&SyntheticParams {
            bias: 0.0,
            observation_noise: 0.0,
            ..base.clone()
        })
        .unwrap();
        let biased = generate(&SyntheticParams {
            bias: 0.5,
            observation_noise: 0.3,
            ..base
        })
        .unwrap();
        assert_eq!(unbiased.true_item_vectors, biased.true_item_vectors);
        assert_eq!(unbiased.users, biased.users);
        assert_eq!(unbiased.items.groups, biased.items.groups);
        assert_eq!(unbiased.items.prior, biased.items.prior);
        assert_eq!(unbiased.items.ids, biased.items.ids);
        assert_ne!(unbiased.items.rows, biased.items.rows);
        // With neither bias nor noise the observed embeddings are the truth.
        assert_eq!(unbiased.items.rows, unbiased.true_item_vectors);
    }

    #[test]
    fn noise_perturbs_every_group_alike() {
        let params = SyntheticParams {
            bias: 0.0,
            observation_noise: 0.5,
            ..small(11)
        };
        let dataset = generate(&params).unwrap();
        let mut squared = [0.0_f64; 2];
        let mut counts = [0usize; 2];
        for (item, &group) in dataset.item_groups().iter().enumerate() {
            let truth = dataset.true_item_vector(item).unwrap();
            let observed = dataset.item_vector(item).unwrap();
            squared[group as usize] += observed
                .iter()
                .zip(truth)
                .map(|(&o, &t)| f64::from(o - t).powi(2))
                .sum::<f64>();
            counts[group as usize] += 1;
        }
        for group in 0..2 {
            let mean = squared[group] / counts[group] as f64;
            // E ||sigma * z / sqrt(D)||^2 = sigma^2.
            assert!((mean - 0.25).abs() < 0.03, "group {group}: {mean}");
        }
    }

    #[test]
    fn per_row_accessors_match_the_generated_tables() {
        let params = small(12);
        let dataset = generate(&params).unwrap();
        let mut row = vec![0.0; params.dim];
        for item in [0, 1, 777, 1_999] {
            true_item_vector(&params, item, &mut row).unwrap();
            assert_eq!(row, dataset.true_item_vector(item).unwrap());
        }
        for user in [0, 150, 299] {
            user_vector(&params, user, &mut row).unwrap();
            assert_eq!(row, dataset.user_vector(user).unwrap());
            assert_eq!(
                true_relevance(&params, user, 42).unwrap(),
                dataset.true_relevance(user, 42).unwrap()
            );
        }
        // Rows depend only on the seed and their index, not on the catalog size.
        let larger = SyntheticParams {
            items: 3_000,
            users: 400,
            ..params.clone()
        };
        true_item_vector(&larger, 777, &mut row).unwrap();
        assert_eq!(row, dataset.true_item_vector(777).unwrap());
        assert!(matches!(
            true_item_vector(&params, 2_000, &mut row),
            Err(DatasetError::IndexOutOfRange { what: "item", .. })
        ));
        assert!(matches!(
            dataset.true_relevance(300, 0),
            Err(DatasetError::IndexOutOfRange { what: "user", .. })
        ));
        let mut short = vec![0.0; 3];
        assert!(user_vector(&params, 0, &mut short).is_err());
    }

    #[test]
    fn bias_under_exposes_the_minority_in_unconstrained_top_k() {
        let params = SyntheticParams {
            bias: 0.3,
            ..small(13)
        };
        let dataset = generate(&params).unwrap();
        let observed = top_k_group_exposure(&dataset, Scoring::Observed, 10, 0..300).unwrap();
        let truth = top_k_group_exposure(&dataset, Scoring::TrueRelevance, 10, 0..300).unwrap();
        assert!((observed.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // In truth the minority earns about its 20% share of exposure ...
        assert!((truth[1] - 0.2).abs() < 0.05, "true exposure {truth:?}");
        // ... but biased embeddings give it far less.
        assert!(
            observed[1] < 0.6 * truth[1],
            "observed {observed:?} vs {truth:?}"
        );
    }

    #[test]
    fn without_bias_exposure_matches_the_truth() {
        let params = SyntheticParams {
            bias: 0.0,
            ..small(13)
        };
        let dataset = generate(&params).unwrap();
        let observed = top_k_group_exposure(&dataset, Scoring::Observed, 10, 0..300).unwrap();
        let truth = top_k_group_exposure(&dataset, Scoring::TrueRelevance, 10, 0..300).unwrap();
        assert!(
            (observed[1] - truth[1]).abs() < 0.04,
            "{observed:?} vs {truth:?}"
        );
        assert!((observed[1] - 0.2).abs() < 0.05, "{observed:?}");
    }

    #[test]
    fn invalid_parameters_are_refused_by_name() {
        let base = small(14);
        let cases: Vec<(SyntheticParams, &str)> = vec![
            (
                SyntheticParams {
                    items: 0,
                    ..base.clone()
                },
                "items",
            ),
            (
                SyntheticParams {
                    users: 0,
                    ..base.clone()
                },
                "users",
            ),
            (
                SyntheticParams {
                    dim: 0,
                    ..base.clone()
                },
                "dim",
            ),
            (
                SyntheticParams {
                    dim: MAX_DIM + 1,
                    ..base.clone()
                },
                "dim",
            ),
            (
                SyntheticParams {
                    groups: 0,
                    ..base.clone()
                },
                "groups",
            ),
            (
                SyntheticParams {
                    groups: 2_001,
                    ..base.clone()
                },
                "groups",
            ),
            (
                SyntheticParams {
                    minority_share: 0.0,
                    ..base.clone()
                },
                "minority_share",
            ),
            (
                SyntheticParams {
                    minority_share: 1.0,
                    ..base.clone()
                },
                "minority_share",
            ),
            (
                SyntheticParams {
                    minority_share: f64::NAN,
                    ..base.clone()
                },
                "minority_share",
            ),
            (
                SyntheticParams {
                    groups: 1,
                    minority_share: 0.2,
                    ..base.clone()
                },
                "minority_share",
            ),
            (
                SyntheticParams {
                    groups: 500,
                    minority_share: 0.01,
                    ..base.clone()
                },
                "minority_share",
            ),
            (
                SyntheticParams {
                    popularity_exponent: -1.0,
                    ..base.clone()
                },
                "popularity_exponent",
            ),
            (
                SyntheticParams {
                    popularity_exponent: f64::INFINITY,
                    ..base.clone()
                },
                "popularity_exponent",
            ),
            (
                SyntheticParams {
                    bias: 1.0,
                    ..base.clone()
                },
                "bias",
            ),
            (
                SyntheticParams {
                    bias: -0.1,
                    ..base.clone()
                },
                "bias",
            ),
            (
                SyntheticParams {
                    bias: f64::NAN,
                    ..base.clone()
                },
                "bias",
            ),
            (
                SyntheticParams {
                    observation_noise: -1.0,
                    ..base.clone()
                },
                "observation_noise",
            ),
        ];
        for (params, field) in cases {
            match generate(&params) {
                Err(DatasetError::InvalidParameter { name, .. }) => {
                    assert_eq!(name, field, "{params:?}")
                }
                other => panic!("{params:?}: expected an error on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn default_parameters_describe_the_default_dataset() {
        let params = SyntheticParams::default();
        params.validate().unwrap();
        assert_eq!(
            (params.items, params.dim, params.users),
            (100_000, 64, 10_000)
        );
        assert_eq!(params.groups, 2);
        assert_eq!(params.group_counts().unwrap(), vec![80_000, 20_000]);
    }
}
