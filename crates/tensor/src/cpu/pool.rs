//! A cache of freed f32 buffers, so the next op of the same size reuses memory instead of asking
//! the system for fresh pages.
//!
//! A training step allocates the same activation and gradient sizes over and over. Straight from
//! the allocator, each large `vec![0.0; n]` is a fresh `mmap` (or a heap region given back and
//! taken again): the kernel faults in and zeroes every page, and glibc zeroes recycled heap memory
//! once more with `memset`. On the small GPT training step that was about 15% of the time. Here,
//! dropping a large f32 [`Storage`](crate::Storage) hands its `Vec` to the pool, and
//! [`for_overwrite`] / [`zeroed`] take one back.
//!
//! The pool never changes a result: [`for_overwrite`] buffers hold stale but initialised values
//! (never uninitialised memory), and its callers write every element before reading any;
//! [`zeroed`] clears what it hands out. It holds at most [`limit_bytes`] (default 1 GiB, set by
//! `RLHF_CPU_POOL_MB`; 0 turns the pool off), giving the oldest buffers back to the system first.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};

/// Buffers smaller than this many elements (256 KiB) go straight back to the allocator: small
/// allocations are cheap (glibc keeps them in its own bins) and would only crowd the pool.
pub const MIN_ELEMS: usize = 1 << 16;

/// A buffer of capacity c serves a request for n elements when n ≤ c ≤ n + n / SLACK.
const SLACK: usize = 4;

struct Pool {
    /// Oldest first.
    free: VecDeque<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: VecDeque::new(),
    bytes: 0,
});

/// The pool's capacity in bytes: `RLHF_CPU_POOL_MB` (MiB) when set and valid, else 1 GiB.
pub fn limit_bytes() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("RLHF_CPU_POOL_MB")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1024)
            .saturating_mul(1 << 20)
    })
}

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves the pool consistent (every mutation is a single
    // push or remove plus a byte count), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pooled buffer of exactly `n` elements, if one fits.
fn take(n: usize) -> Option<Vec<f32>> {
    if n < MIN_ELEMS {
        return None;
    }
    let mut pool = lock();
    let max = n.saturating_add(n / SLACK);
    // Newest first: the most recently freed buffer is the likeliest to be in cache.
    let i = pool
        .free
        .iter()
        .rposition(|v| (n..=max).contains(&v.capacity()))?;
    let mut v = pool.free.remove(i)?;
    pool.bytes -= v.capacity() * 4;
    drop(pool);
    // Lengths only shrink or stay within the initialised prefix: `recycle` keeps every buffer at
    // its full length, so all `capacity` elements hold initialised (stale) values.
    debug_assert_eq!(v.len(), v.capacity());
    v.truncate(n);
    Some(v)
}

/// `n` elements whose values are unspecified (stale results of earlier ops, never uninitialised
/// memory). The caller must write every element before reading it.
pub fn for_overwrite(n: usize) -> Vec<f32> {
    take(n).unwrap_or_else(|| vec![0.0; n])
}

/// `n` zeros.
pub fn zeroed(n: usize) -> Vec<f32> {
    match take(n) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => vec![0.0; n],
    }
}

/// Gives `v` to the pool (or back to the allocator when it is small or the pool is off).
pub fn recycle(mut v: Vec<f32>) {
    let limit = limit_bytes();
    let bytes = v.capacity() * 4;
    if v.capacity() < MIN_ELEMS || bytes > limit {
        return;
    }
    // Every element up to the capacity must be initialised for `take` to hand it out with any
    // length up to the capacity; extend with zeros in the rare case it is not full.
    if v.len() < v.capacity() {
        v.resize(v.capacity(), 0.0);
    }
    let mut evicted = Vec::new();
    {
        let mut pool = lock();
        while pool.bytes + bytes > limit {
            match pool.free.pop_front() {
                Some(old) => {
                    pool.bytes -= old.capacity() * 4;
                    evicted.push(old);
                }
                None => break,
            }
        }
        pool.bytes += bytes;
        pool.free.push_back(v);
    }
    // Freed outside the lock: munmap can take a while.
    drop(evicted);
}

/// A buffer that goes back to the pool when dropped, for scratch kept outside a tensor (the
/// saved activations a backward closure holds, say).
pub struct Pooled(pub Vec<f32>);

impl std::ops::Deref for Pooled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        recycle(std::mem::take(&mut self.0));
    }
}

/// Bytes the pool holds now.
pub fn held_bytes() -> usize {
    lock().bytes
}

/// Overwrites every pooled buffer with `value`. Tests poison the pool with NaN to prove that no
/// op reads a [`for_overwrite`] buffer before writing it (results must not change).
pub fn poison(value: f32) {
    for v in lock().free.iter_mut() {
        v.fill(value);
    }
}

/// Gives every pooled buffer back to the system.
pub fn clear() {
    let free = {
        let mut pool = lock();
        pool.bytes = 0;
        std::mem::take(&mut pool.free)
    };
    drop(free);
}

#[cfg(test)]
mod tests {
    use super::*;

    // The pool is process-wide and other tests use it concurrently, so these only check what
    // holds regardless: sizes, values and that reuse happens for a size nobody else uses.

    #[test]
    fn zeroed_is_zero_and_overwrite_has_the_length() {
        for n in [0, 5, MIN_ELEMS - 1, MIN_ELEMS, 3 * MIN_ELEMS + 7] {
            let mut v = for_overwrite(n);
            assert_eq!(v.len(), n);
            v.iter_mut().for_each(|x| *x = f32::NAN);
            recycle(v);
            let z = zeroed(n);
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn a_recycled_buffer_is_handed_out_again() {
        // An odd size no other test allocates.
        let n = MIN_ELEMS * 7 + 13;
        let v = vec![1.5f32; n];
        let ptr = v.as_ptr();
        recycle(v);
        let w = for_overwrite(n - 3);
        assert_eq!(w.len(), n - 3);
        assert_eq!(w.as_ptr(), ptr, "the pooled buffer is reused");
        assert!(w.iter().all(|&x| x == 1.5), "stale but initialised values");
        // Too large a buffer for the request is not used (at most 1/SLACK extra).
        recycle(w);
        let small = for_overwrite(n / 2);
        assert_ne!(small.as_ptr(), ptr);
    }
}
