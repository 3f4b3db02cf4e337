//! The binary encoding of a DP answer's ledger record ([`StoredRelease`], format version 4).
//!
//! Every charged answer is stored by the ledger for replays, so this encoding is written once
//! per DP request (and stored by the ledger's writer), and read only by a retry. It replaced
//! JSON (format versions 1 and 2, still read): about half the bytes, no field names, no
//! number formatting. Version 4 stores only what a replay shows: the size of the privately
//! selected pool and, for each answer item, its position in the pool's released order and its
//! id (version 3, still read, stored the ids of the whole pool: 100 ids by default where a
//! replay needs 10).
//!
//! # Layout
//!
//! `"FRR"`, the format byte `4`, the fingerprint, the pool size (`u32`), the answer as a list
//! of (`u32` pool position, id string), then the fields of [`StoredRelease`] from `scores` on
//! in declaration order (the version field is the format byte). Integers and floats are
//! little-endian (`u32`, `u64`, IEEE `f32`/`f64` bits, so every float round-trips exactly), a
//! `bool` is one byte 0 or 1, a string or list is a `u32` count then its items (strings as
//! UTF-8 bytes), an `Option` is a byte 0 (none) or 1 then the value, an enum is one byte (its
//! variant's index below). The fingerprint is a byte 0 and the 16 bytes of the digest, or 1
//! and the legacy `u64`. Nothing may follow the last field. Version 3 has, after the
//! fingerprint, the list of the pool's ids and the list of the answer's `u32` positions into
//! it. A JSON record starts with `{`, so the two are told apart by the first byte.

use crate::response::{
    AmortizedGroupExposure, FairnessFallback, FairnessOptimality, FairnessReport,
    FairnessViolation, GroupExposure, ViolationKind,
};

use super::fingerprint::{RequestDigest, StoredFingerprint};
use super::{ReleaseTail, StoredRelease};

/// The first bytes of a binary record: magic and format version.
pub(super) const MAGIC: [u8; 4] = *b"FRR\x04";

/// The format version of binary records.
pub(super) const VERSION: u32 = 4;

/// The first bytes of a version 3 record (earlier releases; still read).
const MAGIC_V3: [u8; 4] = *b"FRR\x03";

/// Format version 3.
const VERSION_V3: u32 = 3;

/// Appends fields to a record.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }

    fn bool(&mut self, value: bool) {
        self.u8(u8::from(value));
    }

    fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }

    fn f64(&mut self, value: f64) {
        self.u64(value.to_bits());
    }

    /// A count (lists never exceed `u32` here: pools and answers are bounded far below).
    fn count(&mut self, count: usize) {
        self.u32(u32::try_from(count).unwrap_or(u32::MAX));
    }

    fn str(&mut self, value: &str) {
        self.count(value.len());
        self.0.extend_from_slice(value.as_bytes());
    }

    fn option<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                write(self, value);
            }
        }
    }
}

/// Reads fields of a record; every read fails (`None`) past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, count: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(count)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }

    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_bits(self.u64()?))
    }

    /// A count of items of at least `min_bytes` each, refused when the rest of the record
    /// cannot hold them (a corrupt count never allocates much).
    fn count(&mut self, min_bytes: usize) -> Option<usize> {
        let count = usize::try_from(self.u32()?).ok()?;
        (count.checked_mul(min_bytes.max(1))? <= self.0.len()).then_some(count)
    }

    fn string(&mut self) -> Option<String> {
        let length = self.count(1)?;
        String::from_utf8(self.bytes(length)?.to_vec()).ok()
    }

    fn list<T>(
        &mut self,
        min_bytes: usize,
        mut read: impl FnMut(&mut Self) -> Option<T>,
    ) -> Option<Vec<T>> {
        let count = self.count(min_bytes)?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(read(self)?);
        }
        Some(items)
    }

    fn option<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        match self.u8()? {
            0 => Some(None),
            1 => read(self).map(Some),
            _ => None,
        }
    }
}

fn fallback_byte(fallback: FairnessFallback) -> u8 {
    match fallback {
        FairnessFallback::None => 0,
        FairnessFallback::BestEffort => 1,
        FairnessFallback::Unconstrained => 2,
        FairnessFallback::NonPersonalized => 3,
    }
}

fn fallback_of(byte: u8) -> Option<FairnessFallback> {
    Some(match byte {
        0 => FairnessFallback::None,
        1 => FairnessFallback::BestEffort,
        2 => FairnessFallback::Unconstrained,
        3 => FairnessFallback::NonPersonalized,
        _ => return None,
    })
}

fn violation_byte(kind: ViolationKind) -> u8 {
    match kind {
        ViolationKind::BelowMinCount => 0,
        ViolationKind::AboveMaxCount => 1,
        ViolationKind::BelowMinExposure => 2,
    }
}

fn violation_of(byte: u8) -> Option<ViolationKind> {
    Some(match byte {
        0 => ViolationKind::BelowMinCount,
        1 => ViolationKind::AboveMaxCount,
        2 => ViolationKind::BelowMinExposure,
        _ => return None,
    })
}

fn write_fairness(out: &mut Writer, report: &FairnessReport) {
    out.str(&report.constraint);
    out.str(&report.group_attribute);
    out.bool(report.satisfied);
    out.count(report.violations.len());
    for violation in &report.violations {
        out.u8(violation_byte(violation.kind));
        out.u32(violation.position);
        out.u32(violation.group);
        out.f64(violation.required);
        out.f64(violation.actual);
        out.str(&violation.description);
    }
    out.u8(fallback_byte(report.fallback));
    out.str(&report.fallback_reason);
    out.f64(report.ndcg_vs_unconstrained);
    out.count(report.groups.len());
    for group in &report.groups {
        out.u32(group.group);
        out.u32(group.items_returned);
        out.u32(group.items_in_pool);
        out.f64(group.exposure_share);
        out.f64(group.unconstrained_exposure_share);
        out.option(group.target_share, Writer::f64);
    }
    out.str(&report.exposure_scope);
    out.count(report.amortized.len());
    for group in &report.amortized {
        out.u32(group.group);
        out.f64(group.exposure_share);
        out.f64(group.merit_share);
    }
    out.option(report.amortized_disparity, Writer::f64);
    out.option(report.optimality, |out, optimality| {
        out.f64(optimality.utility);
        out.f64(optimality.upper_bound);
        out.f64(optimality.gap);
        out.bool(optimality.exact);
    });
    out.option(report.seed, Writer::u64);
    out.count(report.notes.len());
    for note in &report.notes {
        out.str(note);
    }
}

fn read_fairness(input: &mut Reader<'_>) -> Option<FairnessReport> {
    Some(FairnessReport {
        constraint: input.string()?,
        group_attribute: input.string()?,
        satisfied: input.bool()?,
        violations: input.list(29, |input| {
            Some(FairnessViolation {
                kind: violation_of(input.u8()?)?,
                position: input.u32()?,
                group: input.u32()?,
                required: input.f64()?,
                actual: input.f64()?,
                description: input.string()?,
            })
        })?,
        fallback: fallback_of(input.u8()?)?,
        fallback_reason: input.string()?,
        ndcg_vs_unconstrained: input.f64()?,
        groups: input.list(29, |input| {
            Some(GroupExposure {
                group: input.u32()?,
                items_returned: input.u32()?,
                items_in_pool: input.u32()?,
                exposure_share: input.f64()?,
                unconstrained_exposure_share: input.f64()?,
                target_share: input.option(Reader::f64)?,
            })
        })?,
        exposure_scope: input.string()?,
        amortized: input.list(20, |input| {
            Some(AmortizedGroupExposure {
                group: input.u32()?,
                exposure_share: input.f64()?,
                merit_share: input.f64()?,
            })
        })?,
        amortized_disparity: input.option(Reader::f64)?,
        optimality: input.option(|input| {
            Some(FairnessOptimality {
                utility: input.f64()?,
                upper_bound: input.f64()?,
                gap: input.f64()?,
                exact: input.bool()?,
            })
        })?,
        seed: input.option(Reader::u64)?,
        notes: input.list(4, Reader::string)?,
    })
}

fn write_fingerprint(out: &mut Writer, fingerprint: StoredFingerprint) {
    match fingerprint {
        StoredFingerprint::Digest(digest) => {
            out.u8(0);
            out.0.extend_from_slice(&digest.0.to_le_bytes());
        }
        StoredFingerprint::Legacy(hash) => {
            out.u8(1);
            out.u64(hash);
        }
    }
}

fn read_fingerprint(input: &mut Reader<'_>) -> Option<StoredFingerprint> {
    Some(match input.u8()? {
        0 => StoredFingerprint::Digest(RequestDigest(u128::from_le_bytes(
            input.bytes(16)?.try_into().ok()?,
        ))),
        1 => StoredFingerprint::Legacy(input.u64()?),
        _ => return None,
    })
}

/// Writes `tail` with the fairness report `fairness` (the tail's own `fairness` is not read).
fn write_tail(out: &mut Writer, tail: &ReleaseTail, fairness: Option<&FairnessReport>) {
    out.option(tail.scores.as_ref(), |out, scores| {
        out.count(scores.len());
        for score in scores {
            out.u32(score.to_bits());
        }
    });
    out.f64(tail.rho);
    out.f64(tail.epsilon);
    out.f64(tail.delta);
    out.option(tail.score_noise_stddev, Writer::f64);
    out.f64(tail.user_norm_bound);
    out.option(fairness, write_fairness);
}

fn read_tail(input: &mut Reader<'_>) -> Option<ReleaseTail> {
    Some(ReleaseTail {
        scores: input.option(|input| input.list(4, |input| Some(f32::from_bits(input.u32()?))))?,
        rho: input.f64()?,
        epsilon: input.f64()?,
        delta: input.f64()?,
        score_noise_stddev: input.option(Reader::f64)?,
        user_norm_bound: input.f64()?,
        fairness: input.option(read_fairness)?,
    })
}

/// The binary record (format version 4) of `release` with the fairness report `fairness`
/// (passed apart so that the release path need not clone it into the record; the record's
/// own `fairness` field is not read). Its `version` field is not stored: the format byte is.
pub(super) fn encode(release: &StoredRelease, fairness: Option<&FairnessReport>) -> Vec<u8> {
    let ids: usize = release.answer.iter().map(|(_, id)| 8 + id.len()).sum();
    let mut out = Writer(Vec::with_capacity(256 + ids + 4 * release.answer.len()));
    out.0.extend_from_slice(&MAGIC);
    write_fingerprint(&mut out, release.fingerprint);
    out.u32(release.picks);
    out.count(release.answer.len());
    for (position, id) in &release.answer {
        out.u32(*position);
        out.str(id);
    }
    write_tail(&mut out, &release.tail, fairness);
    out.0
}

/// The record encoded by [`encode`] (version 4) or by the version 3 encoder of earlier
/// releases (the whole pool's ids and the answer's positions into it; converted: the pool's
/// size and the answer's ids are kept); `None` for anything else (wrong magic, truncated,
/// out-of-range values, trailing bytes).
pub(super) fn decode(bytes: &[u8]) -> Option<StoredRelease> {
    if let Some(rest) = bytes.strip_prefix(&MAGIC_V3) {
        let mut input = Reader(rest);
        let fingerprint = read_fingerprint(&mut input)?;
        let pool = input.list(4, Reader::string)?;
        let positions = input.list(4, Reader::u32)?;
        let tail = read_tail(&mut input)?;
        if !input.0.is_empty() {
            return None;
        }
        return Some(StoredRelease::from_pool(
            VERSION_V3,
            fingerprint,
            pool,
            &positions,
            tail,
        ));
    }
    let mut input = Reader(bytes.strip_prefix(&MAGIC)?);
    let fingerprint = read_fingerprint(&mut input)?;
    let picks = input.u32()?;
    let answer = input.list(8, |input| Some((input.u32()?, input.string()?)))?;
    let tail = read_tail(&mut input)?;
    input.0.is_empty().then_some(StoredRelease {
        version: VERSION,
        fingerprint,
        picks,
        answer,
        tail,
    })
}

/// The version 3 record of a whole pool (what earlier releases wrote; tests only).
#[cfg(test)]
pub(super) fn encode_v3(legacy: &super::LegacyRelease) -> Vec<u8> {
    let mut out = Writer(Vec::new());
    out.0.extend_from_slice(&MAGIC_V3);
    write_fingerprint(&mut out, legacy.fingerprint);
    out.count(legacy.pool.len());
    for id in &legacy.pool {
        out.str(id);
    }
    out.count(legacy.answer.len());
    for &position in &legacy.answer {
        out.u32(position);
    }
    write_tail(&mut out, &legacy.tail, legacy.tail.fairness.as_ref());
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::private::LegacyRelease;

    fn full_record() -> StoredRelease {
        StoredRelease {
            version: VERSION,
            fingerprint: StoredFingerprint::Digest(RequestDigest(
                0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            )),
            picks: 3,
            answer: vec![
                (2, "élément-ü".into()),
                (0, "item-1".into()),
                (1, String::new()),
            ],
            tail: full_tail(),
        }
    }

    fn full_tail() -> ReleaseTail {
        ReleaseTail {
            scores: Some(vec![0.5, -1.25, f32::MIN_POSITIVE]),
            rho: 0.012_5,
            epsilon: 1.0 / 3.0,
            delta: 1e-6,
            score_noise_stddev: Some(0.1),
            user_norm_bound: 1.0,
            fairness: Some(FairnessReport {
                constraint: "fa*ir".into(),
                group_attribute: "provider_group".into(),
                satisfied: false,
                violations: vec![FairnessViolation {
                    kind: ViolationKind::BelowMinExposure,
                    position: 3,
                    group: 1,
                    required: 2.0,
                    actual: 1.0,
                    description: "too few".into(),
                }],
                fallback: FairnessFallback::BestEffort,
                fallback_reason: "infeasible".into(),
                ndcg_vs_unconstrained: 0.97,
                groups: vec![GroupExposure {
                    group: 1,
                    items_returned: 2,
                    items_in_pool: 5,
                    exposure_share: 0.3,
                    unconstrained_exposure_share: 0.2,
                    target_share: Some(0.4),
                }],
                exposure_scope: "scope".into(),
                amortized: vec![AmortizedGroupExposure {
                    group: 0,
                    exposure_share: 0.6,
                    merit_share: 0.5,
                }],
                amortized_disparity: Some(0.1),
                optimality: Some(FairnessOptimality {
                    utility: 1.0,
                    upper_bound: 1.5,
                    gap: 0.5,
                    exact: true,
                }),
                seed: Some(42),
                notes: vec!["a note".into()],
            }),
        }
    }

    #[test]
    fn records_round_trip_exactly() {
        let full = full_record();
        assert_eq!(
            decode(&encode(&full, full.tail.fairness.as_ref())),
            Some(full.clone())
        );
        let sparse = StoredRelease {
            fingerprint: StoredFingerprint::Legacy(7),
            tail: ReleaseTail {
                scores: None,
                score_noise_stddev: None,
                fairness: None,
                ..full.tail
            },
            ..full
        };
        assert_eq!(decode(&encode(&sparse, None)), Some(sparse));
    }

    #[test]
    fn damaged_records_are_refused_without_panicking() {
        let full = full_record();
        let bytes = encode(&full, full.tail.fairness.as_ref());
        for length in 0..bytes.len() {
            assert_eq!(decode(&bytes[..length]), None, "truncated to {length}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
        // Every single-byte change either still decodes or is refused; never a panic.
        for index in 0..bytes.len() {
            for value in [0x00, 0x02, 0x7f, 0xff] {
                let mut changed = bytes.clone();
                changed[index] = value;
                let _ = decode(&changed);
            }
        }
        // A huge count is refused before allocating.
        let mut huge = MAGIC.to_vec();
        huge.push(1);
        huge.extend_from_slice(&7_u64.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), None);
    }

    /// The pool of `full_record` (ids by position) as earlier formats stored it.
    fn legacy_record(version: u32) -> LegacyRelease {
        let full = full_record();
        LegacyRelease {
            version,
            fingerprint: full.fingerprint,
            pool: vec!["item-1".into(), String::new(), "élément-ü".into()],
            answer: vec![2, 0, 1],
            tail: full.tail,
        }
    }

    #[test]
    fn binary_records_are_smaller_and_json_and_version_3_ones_still_read() {
        let record = full_record();
        let binary = record.encode(record.tail.fairness.as_ref());
        assert!(binary.starts_with(&MAGIC));
        let json = serde_json::to_vec(&legacy_record(2)).expect("json");
        // Earlier releases wrote the fields after the answer at the top level, beside the pool.
        let fields: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert!(fields.get("tail").is_none(), "{fields}");
        assert_eq!(fields["rho"], serde_json::json!(0.012_5));
        assert!(fields["fairness"].is_object(), "{fields}");
        assert!(
            binary.len() * 2 < json.len(),
            "{} vs {}",
            binary.len(),
            json.len()
        );
        assert_eq!(StoredRelease::decode(&binary).expect("decodes"), record);
        // Earlier formats decode to the same answer (ids and pool positions) and pool size.
        let old = StoredRelease::decode(&json).expect("a version 2 record still decodes");
        assert_eq!(
            old,
            StoredRelease {
                version: 2,
                ..record.clone()
            }
        );
        let v3 = encode_v3(&legacy_record(3));
        assert!(v3.starts_with(&MAGIC_V3));
        assert_eq!(
            StoredRelease::decode(&v3).expect("a version 3 record still decodes"),
            StoredRelease {
                version: 3,
                ..record.clone()
            }
        );
        // Version 1 records had no fairness report.
        let mut v1 = serde_json::to_value(legacy_record(1)).expect("json");
        v1.as_object_mut().expect("an object").remove("fairness");
        let v1 = StoredRelease::decode(&serde_json::to_vec(&v1).expect("json"))
            .expect("a version 1 record still decodes");
        assert_eq!(v1.tail.fairness, None);
        assert_eq!(v1.tail.rho, record.tail.rho);
        assert!(StoredRelease::decode(b"FRR\x03garbage").is_err());
        assert!(StoredRelease::decode(b"FRR\x04garbage").is_err());
    }

    #[test]
    fn a_record_holds_the_answer_ids_only_not_the_pool() {
        // A pool of 100 ids and an answer of 10 (the server's defaults).
        let pool: Vec<String> = (0..100).map(|index| format!("item-{index:06}")).collect();
        let positions: Vec<u32> = (0..10).map(|index| 9 * index + 3).collect();
        let legacy = LegacyRelease {
            version: 3,
            pool: pool.clone(),
            answer: positions.clone(),
            tail: ReleaseTail {
                fairness: None,
                ..full_tail()
            },
            ..legacy_record(3)
        };
        let release = StoredRelease::decode(&encode_v3(&legacy)).expect("decodes");
        assert_eq!(release.picks, 100);
        assert_eq!(
            release.answer,
            positions
                .iter()
                .map(|&position| (position, pool[position as usize].clone()))
                .collect::<Vec<_>>()
        );
        let v4 = release.encode(None);
        assert!(
            v4.len() * 4 < encode_v3(&legacy).len(),
            "{} vs {}",
            v4.len(),
            encode_v3(&legacy).len()
        );
        assert_eq!(
            StoredRelease::decode(&v4).expect("decodes"),
            StoredRelease {
                version: VERSION,
                ..release
            }
        );
    }
}
