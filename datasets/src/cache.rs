//! The cache of generated datasets and the built-in default dataset, generated on first use.
//!
//! Files are named after [`GENERATOR_VERSION`] and [`SyntheticParams::fingerprint`], so a
//! changed generator or parameter set never serves stale data. Table files are published by the
//! store's atomic writer (temporary file, fsync, rename), so two processes racing to generate the
//! same dataset both succeed and readers never see a partial file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use store::{Table, TableData, TableRole, TableWriter};

use crate::error::DatasetError;
use crate::progress;
use crate::synthetic::{GENERATOR_VERSION, SyntheticParams, generate_with_progress};

/// Environment variable that overrides the cache folder.
pub const CACHE_ENV_VAR: &str = "FAIRRANK_CACHE";

/// Extension of cached table files.
pub const TABLE_EXTENSION: &str = "frt";

/// Paths of a generated dataset's table files.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultDataset {
    /// Item table: observed embeddings, `provider_group`, prior.
    pub items: PathBuf,
    /// User table.
    pub users: PathBuf,
    /// Item table with the true latent vectors instead of the observed embeddings (same ids,
    /// groups and prior): true relevance is `<user row, true item row>`.
    pub true_items: PathBuf,
    /// The parameters the files were generated from.
    pub params: SyntheticParams,
}

/// The cache folder: `$FAIRRANK_CACHE` if set, else `$XDG_CACHE_HOME/fairrank`, else
/// `$HOME/.cache/fairrank`, else `./.fairrank-cache`. Empty variables count as unset, and so does
/// a relative `XDG_CACHE_HOME` (the XDG specification says to ignore it).
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|name| std::env::var_os(name))
}

/// [`cache_dir`] with the environment given as a lookup function.
fn cache_dir_from(lookup: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let non_empty = |name: &str| lookup(name).filter(|value| !value.is_empty());
    if let Some(folder) = non_empty(CACHE_ENV_VAR) {
        return PathBuf::from(folder);
    }
    if let Some(folder) = non_empty("XDG_CACHE_HOME").map(PathBuf::from)
        && folder.is_absolute()
    {
        return folder.join("fairrank");
    }
    if let Some(home) = non_empty("HOME") {
        return PathBuf::from(home).join(".cache").join("fairrank");
    }
    PathBuf::from(".fairrank-cache")
}

/// Where the tables of `params` live inside `folder` (whether or not they exist yet).
pub fn dataset_paths(folder: &Path, params: &SyntheticParams) -> DefaultDataset {
    let stem = format!(
        "synthetic-v{GENERATOR_VERSION}-{:016x}",
        params.fingerprint()
    );
    let file = |kind: &str| folder.join(format!("{stem}-{kind}.{TABLE_EXTENSION}"));
    DefaultDataset {
        items: file("items"),
        users: file("users"),
        true_items: file("true-items"),
        params: params.clone(),
    }
}

/// The built-in default dataset ([`SyntheticParams::default`]) in [`cache_dir`], generated on
/// first use (a few seconds in release builds, with a progress bar on stderr).
pub fn default_dataset() -> Result<DefaultDataset, DatasetError> {
    cached_dataset(&cache_dir(), &SyntheticParams::default())
}

/// The tables of `params` in `folder`, generated and written there unless valid files exist.
///
/// Existing files are reused only if the store opens them and their shapes match `params`;
/// anything else (missing, truncated, older store format) is regenerated.
pub fn cached_dataset(
    folder: &Path,
    params: &SyntheticParams,
) -> Result<DefaultDataset, DatasetError> {
    params.validate()?;
    let paths = dataset_paths(folder, params);
    let tables = [
        (&paths.items, params.items, TableRole::Items),
        (&paths.users, params.users, TableRole::Users),
        (&paths.true_items, params.items, TableRole::Items),
    ];
    if tables
        .iter()
        .all(|&(path, rows, role)| is_valid_table(path, rows, params.dim, role))
    {
        return Ok(paths);
    }
    std::fs::create_dir_all(folder)
        .map_err(|source| DatasetError::io(folder, "create the cache folder", source))?;
    let dataset = generate_with_progress(params)?;
    let show = params.items.saturating_mul(params.dim) >= 1_000_000;
    write_cached(
        &paths.true_items,
        &dataset.true_item_table(),
        TableRole::Items,
        show,
    )?;
    write_cached(&paths.users, &dataset.users, TableRole::Users, show)?;
    write_cached(&paths.items, &dataset.items, TableRole::Items, show)?;
    Ok(paths)
}

/// Whether `path` holds a table of this shape that may serve as `role` (marked so, or
/// unmarked: cached by a version from before the role flags, still served as is).
fn is_valid_table(path: &Path, rows: usize, dim: usize, role: TableRole) -> bool {
    match Table::open(path) {
        Ok(table) => {
            table.len() == rows && table.dim() == dim && table.role().is_none_or(|r| r == role)
        }
        Err(_) => false,
    }
}

/// Publishes one table of a generated dataset, marked with its role.
fn write_cached(
    path: &Path,
    data: &TableData,
    role: TableRole,
    show_progress: bool,
) -> Result<(), DatasetError> {
    let spinner = progress::spinner(format!("writing {}", path.display()), show_progress);
    let result = TableWriter::new().role(role).write(path, data);
    spinner.finish_and_clear();
    result.map(|_| ()).map_err(|source| DatasetError::Store {
        action: "writing a cached dataset table",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| OsString::from(value))
        }
    }

    #[test]
    fn cache_dir_prefers_fairrank_cache_then_xdg_then_home() {
        let all = [
            ("FAIRRANK_CACHE", "/data/fr"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/me"),
        ];
        assert_eq!(cache_dir_from(lookup(&all)), PathBuf::from("/data/fr"));
        assert_eq!(
            cache_dir_from(lookup(&all[1..])),
            PathBuf::from("/xdg/fairrank")
        );
        assert_eq!(
            cache_dir_from(lookup(&all[2..])),
            PathBuf::from("/home/me/.cache/fairrank")
        );
        assert_eq!(
            cache_dir_from(lookup(&[])),
            PathBuf::from(".fairrank-cache")
        );
    }

    #[test]
    fn cache_dir_ignores_empty_and_relative_values() {
        let pairs = [
            ("FAIRRANK_CACHE", ""),
            ("XDG_CACHE_HOME", "relative/cache"),
            ("HOME", "/home/me"),
        ];
        assert_eq!(
            cache_dir_from(lookup(&pairs)),
            PathBuf::from("/home/me/.cache/fairrank")
        );
        assert_eq!(
            cache_dir_from(lookup(&[("HOME", "")])),
            PathBuf::from(".fairrank-cache")
        );
    }

    #[test]
    fn file_names_change_with_every_parameter() {
        let folder = Path::new("/cache");
        let base = SyntheticParams::default();
        let base_paths = dataset_paths(folder, &base);
        assert!(base_paths.items.starts_with(folder));
        let variants = [
            SyntheticParams {
                items: 99_999,
                ..base.clone()
            },
            SyntheticParams {
                dim: 32,
                ..base.clone()
            },
            SyntheticParams {
                users: 1,
                ..base.clone()
            },
            SyntheticParams {
                groups: 3,
                ..base.clone()
            },
            SyntheticParams {
                minority_share: 0.3,
                ..base.clone()
            },
            SyntheticParams {
                popularity_exponent: 0.8,
                ..base.clone()
            },
            SyntheticParams {
                bias: 0.0,
                ..base.clone()
            },
            SyntheticParams {
                observation_noise: 0.0,
                ..base.clone()
            },
            SyntheticParams {
                seed: 43,
                ..base.clone()
            },
        ];
        let mut names = vec![base_paths.items.clone()];
        for variant in &variants {
            let paths = dataset_paths(folder, variant);
            assert!(!names.contains(&paths.items), "{variant:?}");
            names.push(paths.items);
        }
        assert_eq!(dataset_paths(folder, &base), base_paths);
        let distinct = [&base_paths.items, &base_paths.users, &base_paths.true_items];
        assert_ne!(distinct[0], distinct[1]);
        assert_ne!(distinct[1], distinct[2]);
    }
}
