//! Scratch buffers that outlive one step: each thread keeps the buffers its kernels returned and
//! hands them out again, so a training loop stops paying for fresh pages (page faults and the
//! kernel zeroing them) on every step.
//!
//! A buffer from [`Work::new`] holds whatever its last user left in it; every kernel either
//! overwrites what it reads or asks for [`Work::zeroed`].

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers a thread keeps at most.
const KEEP: usize = 24;
/// Bytes a thread keeps at most: above that (one large evaluation, say), buffers go back to the
/// allocator, smallest first, so a worker does not pin its peak for the life of the process.
const KEEP_BYTES: usize = 256 << 20;

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
        Self::fitting(len, usize::MAX)
    }

    /// `len` values for a tensor's storage ([`Work::into_vec`]): only a pooled buffer at most
    /// a quarter larger is taken, so a tensor never carries much more memory than it shows.
    pub(super) fn for_output(len: usize) -> Self {
        Self::fitting(len, len + len / 4)
    }

    /// The smallest pooled buffer of `len..=most` values, or a new one.
    fn fitting(len: usize, most: usize) -> Self {
        if len == 0 {
            return Self {
                buf: Vec::new(),
                len,
            };
        }
        let reused = POOL.with_borrow_mut(|pool| {
            pool.iter()
                .enumerate()
                .filter(|(_, b)| (len..=most).contains(&b.len()))
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
        if buf.len() * size_of::<f32>() > KEEP_BYTES {
            return;
        }
        // A thread being torn down has no pool left; the buffer is simply freed then.
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.push(buf);
            let bytes = |pool: &[Vec<f32>]| {
                pool.iter()
                    .map(|b| b.len() * size_of::<f32>())
                    .sum::<usize>()
            };
            while pool.len() > KEEP || bytes(&pool) > KEEP_BYTES {
                let smallest = pool
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| b.len())
                    .map(|(i, _)| i);
                match smallest {
                    Some(i) => drop(pool.swap_remove(i)),
                    None => break,
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
        // An output never takes a buffer much larger than it needs, nor an empty one a buffer.
        let o = Work::for_output(10);
        assert!(o.buf.capacity() < 20);
        assert!(Work::new(0).buf.capacity() == 0);
    }

    #[test]
    fn a_thread_keeps_a_bounded_number_of_bytes() {
        let big = KEEP_BYTES / size_of::<f32>() / 3 + 1;
        let held: Vec<Work> = (0..4).map(|_| Work::new(big)).collect();
        drop(held);
        let kept =
            POOL.with_borrow(|p| p.iter().map(|b| b.len() * size_of::<f32>()).sum::<usize>());
        assert!(kept <= KEEP_BYTES, "{kept} bytes kept");
        let huge = Work::new(KEEP_BYTES / size_of::<f32>() + 1);
        drop(huge);
        assert!(POOL.with_borrow(|p| p.iter().all(|b| b.len() * size_of::<f32>() <= KEEP_BYTES)));
    }
}
