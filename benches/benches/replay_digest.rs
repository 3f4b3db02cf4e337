//! The idempotency store's request digest on a T1-sized request (1000 ids of 8 bytes): the
//! keyed PRFs it could use, over the bytes `fairrank::serve::replay` hashes (about 60 bytes of
//! message, 1000 length bytes, 8000 id bytes).
//!
//! `sip13`: SipHash-1-3 as the standard library's `DefaultHasher` (64-bit output; the store's
//! former 128-bit variant compressed the same words and added one finalization).
//! `xxh3-128-two-updates`: what the store computes since branch `body`, streaming XXH3-128
//! under a random 192-byte secret, fed the part before the ids and the ids.
//! `xxh3-128-one-shot`: the same hash over one contiguous buffer. `blake3-one-buffer`:
//! keyed BLAKE3 over one contiguous buffer (the ids copied after the rest, which
//! `copy-ids-into-buffer` costs). `blake3-two-updates`: the same bytes fed as the part before
//! the ids and the ids, which leaves BLAKE3's 1 KiB chunks misaligned with the ids. On the
//! 2-core development machine (2026-11-29) SipHash-1-3 beat BLAKE3 (BENCHMARKS.md, branch
//! `srvcpu`), and XXH3-128 beat SipHash-1-3, so the store uses XXH3-128 (branch `body`; the
//! module documentation of `fairrank::serve::replay` says why a keyed XXH3 is enough there).
//!
//! `cargo bench -p benches --bench replay_digest`

use std::hash::Hasher;

use criterion::{Criterion, criterion_group, criterion_main};
use xxhash_rust::xxh3::{Xxh3, xxh3_128_with_secret};

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
    let secret: [u8; 192] = std::array::from_fn(|i| (i as u8).wrapping_mul(151).wrapping_add(17));
    group.bench_function("xxh3-128-two-updates", |b| {
        b.iter(|| {
            let mut hasher = Xxh3::with_secret(secret);
            hasher.update(std::hint::black_box(&head));
            hasher.update(std::hint::black_box(&ids));
            hasher.digest128()
        });
    });
    group.bench_function("xxh3-128-one-shot", |b| {
        b.iter(|| xxh3_128_with_secret(std::hint::black_box(&whole), &secret));
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
