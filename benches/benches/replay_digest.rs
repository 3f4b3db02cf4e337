//! The idempotency store's request digest on a T1-sized request (1000 ids of 8 bytes): the
//! keyed PRFs it could use, over the bytes `fairrank::serve::replay` hashes (about 60 bytes of
//! message, 1000 length bytes, 8000 id bytes).
//!
//! `sip13`: SipHash-1-3 as the standard library's `DefaultHasher` (64-bit output; the store's
//! 128-bit variant compresses the same words and adds one finalization). `blake3-one-buffer`:
//! keyed BLAKE3 over one contiguous buffer (the ids copied after the rest, which
//! `copy-ids-into-buffer` costs). `blake3-two-updates`: the same bytes fed as the part before
//! the ids and the ids, which leaves BLAKE3's 1 KiB chunks misaligned with the ids. On the
//! 2-core development machine (2026-11-29) SipHash-1-3 was the fastest, so the store keeps it
//! (BENCHMARKS.md, branch `srvcpu`).
//!
//! `cargo bench -p benches --bench replay_digest`

use std::hash::Hasher;

use criterion::{Criterion, criterion_group, criterion_main};

fn t1_shaped_request() -> (Vec<u8>, Vec<u8>) {
    let mut head: Vec<u8> = (0..60_u8).collect();
    head.extend(std::iter::repeat_n(8_u8, 1000));
    let ids: Vec<u8> = (0..1000)
        .flat_map(|i: u32| format!("i{:07}", i * 97).into_bytes())
        .collect();
    (head, ids)
}

fn digest(c: &mut Criterion) {
    let (head, ids) = t1_shaped_request();
    let mut whole = head.clone();
    whole.extend_from_slice(&ids);
    let key = [7_u8; 32];
    let mut group = c.benchmark_group("replay_digest");
    group.bench_function("sip13", |b| {
        b.iter(|| {
            let mut hasher = std::hash::DefaultHasher::new();
            hasher.write(std::hint::black_box(&whole));
            hasher.finish()
        });
    });
    group.bench_function("blake3-one-buffer", |b| {
        b.iter(|| {
            let mut hasher = blake3::Hasher::new_keyed(&key);
            hasher.update(std::hint::black_box(&whole));
            let mut out = [0_u8; 16];
            hasher.finalize_xof().fill(&mut out);
            out
        });
    });
    group.bench_function("blake3-two-updates", |b| {
        b.iter(|| {
            let mut hasher = blake3::Hasher::new_keyed(&key);
            hasher.update(std::hint::black_box(&head));
            hasher.update(std::hint::black_box(&ids));
            let mut out = [0_u8; 16];
            hasher.finalize_xof().fill(&mut out);
            out
        });
    });
    group.bench_function("copy-ids-into-buffer", |b| {
        let mut buffer = Vec::with_capacity(whole.len());
        b.iter(|| {
            buffer.clear();
            buffer.extend_from_slice(std::hint::black_box(&head));
            buffer.extend_from_slice(std::hint::black_box(&ids));
            buffer.len()
        });
    });
    group.finish();
}

criterion_group!(benches, digest);
criterion_main!(benches);
