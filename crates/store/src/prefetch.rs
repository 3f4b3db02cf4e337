//! Cache hints: safe wrappers over `_mm_prefetch` (no-ops on other architectures).
//!
//! A prefetch only asks the CPU to start loading a cache line; it never faults, whatever the
//! address, and has no effect on results. The wrappers take slices so that callers never
//! handle raw pointers, and do nothing for an index out of range.

/// Asks the CPU to start loading the cache line of `slice[index]` into L1 (and the levels
/// below it). Nothing when `index` is out of range.
#[inline(always)]
pub(crate) fn element<T>(slice: &[T], index: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(element) = slice.get(index) {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: `_mm_prefetch` only hints the cache; it never faults and has no observable
        // effect (the address is a valid element here anyway). SSE, which it requires, is
        // part of the x86-64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(element).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (slice, index);
}

/// Asks the CPU to start loading every cache line of `data` into L2 (not L1). L2 tracks more
/// outstanding misses than L1, so hints for data needed a little later (a candidate row that
/// a gather will read after the id lookups) keep more loads in flight this way, without
/// filling L1 with lines the next few instructions do not use.
#[inline(always)]
pub(crate) fn lines_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        let start = data.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(data);
        let mut offset = 0;
        while offset < bytes {
            // SAFETY: `_mm_prefetch` only hints the cache; it never faults and has no
            // observable effect whatever the address (which is inside `data` here anyway).
            // SSE, which it requires, is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(start.wrapping_add(offset)) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
