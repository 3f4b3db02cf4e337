//! Cache warming of the table data a request reads after scoring: the pool's group labels
//! and the likely answer rows' ids, requested as soon as the pool is known so that their
//! cache misses overlap each other (and the re-ranking) instead of following one another.
//! Hints only: nothing here changes a result.

use kernels::ScoredItem;
use store::Table;

/// Asks the CPU to start loading the cache line of `slice[index]` into L2 (nothing when
/// `index` is out of range). The hint itself is the kernels' safe [`kernels::prefetch_l2`],
/// so the engine has no `unsafe` of its own.
#[inline(always)]
fn prefetch_element<T>(slice: &[T], index: usize) {
    if let Some(element) = slice.get(index) {
        kernels::prefetch_l2(std::slice::from_ref(element));
    }
}

/// Starts loading what the fairness stage and the answer read from `table` for `pool`
/// (best first) when `k` items are asked for: the labels of attribute `group_attribute`
/// (if any) of every pool row, every attribute's labels of the first `k` pool rows, and
/// the ids of the first `k` pool rows (the answer of the `none` constraint, and mostly the
/// answer of the others). The labels are prefetched; an id's place is only known from its
/// offset, so the ids are read (their misses overlap in one short loop).
pub(crate) fn warm_pool(
    table: &Table,
    group_attribute: Option<usize>,
    pool: &[ScoredItem],
    k: usize,
) {
    let answer = &pool[..k.min(pool.len())];
    if let Some(labels) = group_attribute.and_then(|attribute| table.get_group_labels(attribute)) {
        for item in pool {
            prefetch_element(labels, item.index as usize);
        }
    }
    for attribute in 0..table.group_attribute_names().len() {
        if Some(attribute) == group_attribute {
            continue;
        }
        if let Some(labels) = table.get_group_labels(attribute) {
            for item in answer {
                prefetch_element(labels, item.index as usize);
            }
        }
    }
    let mut id_bytes = 0_usize;
    for item in answer {
        id_bytes += table.get_id(item.index as usize).map_or(0, str::len);
    }
    // The lengths are not needed: only the reads are (which the optimizer may not drop).
    std::hint::black_box(id_bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{GroupAttribute, TableData, write_table};

    fn table(rows: usize, attributes: usize) -> (tempfile::TempDir, Table) {
        let folder = tempfile::tempdir().expect("temporary folder");
        let path = folder.path().join("items.frt");
        let data = TableData {
            dim: 2,
            rows: (0..rows * 2).map(|value| value as f32).collect(),
            ids: (0..rows).map(|row| format!("item-{row}")).collect(),
            groups: (0..attributes)
                .map(|attribute| GroupAttribute {
                    name: format!("attribute-{attribute}"),
                    labels: (0..rows as u32).map(|row| row % 3).collect(),
                })
                .collect(),
            prior: None,
            dim_names: None,
        };
        write_table(&path, &data).expect("written");
        (folder, Table::open(&path).expect("opened"))
    }

    #[test]
    fn warming_accepts_any_pool_k_and_attribute() {
        // Rows past the table, k beyond the pool or 0, an attribute out of range, none:
        // warming reads only what exists and never panics.
        for attributes in [0, 1, 2] {
            let (_folder, table) = table(50, attributes);
            let pool: Vec<ScoredItem> = [3_u32, 49, 50, 7, u32::MAX, 0]
                .iter()
                .map(|&row| ScoredItem::new(row, 1.0))
                .collect();
            for group_attribute in [None, Some(0), Some(1), Some(5)] {
                for k in [0, 1, 3, pool.len(), 100] {
                    warm_pool(&table, group_attribute, &pool, k);
                    warm_pool(&table, group_attribute, &[], k);
                }
            }
        }
    }
}
