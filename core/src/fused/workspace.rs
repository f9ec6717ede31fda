//! Scratch buffers that outlive one step: each thread keeps the buffers its kernels returned and
//! hands them out again, so a training loop stops paying for fresh pages (page faults and the
//! kernel zeroing them) on every step.
//!
//! A buffer from [`Work::new`] holds whatever its last user left in it; every kernel either
//! overwrites what it reads or asks for [`Work::zeroed`].

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps at most; the smallest are dropped beyond that.
const KEEP: usize = 24;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` values, returned to this thread's pool when dropped.
#[derive(Debug)]
pub(super) struct Work {
    /// Always `len() == capacity()`, so reuse never writes to extend it.
    buf: Vec<f32>,
    len: usize,
}

impl Work {
    /// `len` values with unspecified contents (left over from earlier use).
    pub(super) fn new(len: usize) -> Self {
        let reused = POOL.with_borrow_mut(|pool| {
            pool.iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
                .map(|i| pool.swap_remove(i))
        });
        let buf = reused.unwrap_or_else(|| vec![0.0; len]);
        Self { buf, len }
    }

    /// `len` zeros.
    pub(super) fn zeroed(len: usize) -> Self {
        let mut w = Self::new(len);
        w.fill(0.0);
        w
    }

    /// The values as a vector of exactly `len`, leaving the pool (for a tensor's storage).
    pub(super) fn into_vec(mut self) -> Vec<f32> {
        let mut v = std::mem::take(&mut self.buf);
        v.truncate(self.len);
        v
    }
}

impl Deref for Work {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Work {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.is_empty() {
            return;
        }
        // A thread being torn down has no pool left; the buffer is simply freed then.
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.push(buf);
            if pool.len() > KEEP {
                let smallest = pool
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                if let Some(i) = smallest {
                    pool.swap_remove(i);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_zeroed_means_zeroed() {
        let mut a = Work::new(1000);
        a.fill(7.0);
        let ptr = a.as_ptr();
        drop(a);
        let b = Work::new(600);
        assert_eq!(b.len(), 600);
        assert_eq!(b.as_ptr(), ptr, "the returned buffer is reused");
        drop(b);
        let z = Work::zeroed(800);
        assert!(z.iter().all(|&v| v == 0.0));
        let v = z.into_vec();
        assert_eq!(v.len(), 800);
    }
}
