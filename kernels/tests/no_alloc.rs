//! Checks that the single-threaded hot paths allocate nothing once their buffers are warm.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use kernels::{AlignedRows, TopKScratch, candidates_topk, scan_topk, score_candidates};

/// Counts allocations made by this test binary (the system allocator does the work).
struct CountingAllocator;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread under test: only its allocations count (the test harness's own
    /// threads may allocate at any time, e.g. when a slow test is reported on a busy machine).
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts one allocation if the current thread is the one under test.
fn count() {
    if COUNTING.try_with(std::cell::Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` unchanged, which upholds the `GlobalAlloc`
// contract; counting has no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn warm_single_threaded_kernels_do_not_allocate() {
    let (rows, dim) = (5000, 100);
    let mut table = AlignedRows::zeros(rows, dim).unwrap();
    for (i, x) in table.as_padded_slice_mut().iter_mut().enumerate() {
        *x = ((i * 7919) % 1000) as f32 / 1000.0 - 0.5;
    }
    let m = table.as_matrix();
    let query: Vec<f32> = (0..dim).map(|i| (i as f32 * 0.37).sin()).collect();
    let candidates: Vec<u32> = (0..rows as u32).step_by(3).collect();
    let mut scratch = TopKScratch::new();
    let mut top = Vec::new();
    let mut scores = Vec::new();

    // Warm up: buffers grow to their working size.
    scan_topk(m, &query, 50, &mut scratch, &mut top).unwrap();
    candidates_topk(m, &query, &candidates, 50, &mut scratch, &mut top).unwrap();
    score_candidates(m, &query, &candidates, &mut scores).unwrap();

    COUNTING.with(|counting| counting.set(true));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..10 {
        scan_topk(m, &query, 50, &mut scratch, &mut top).unwrap();
        candidates_topk(m, &query, &candidates, 50, &mut scratch, &mut top).unwrap();
        score_candidates(m, &query, &candidates, &mut scores).unwrap();
    }
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), before);
    assert_eq!(top.len(), 50);
    assert_eq!(scores.len(), candidates.len());
}
