//! The CPU backend's one unsafe module: matrix products through the `gemm` crate, behind a safe
//! function that checks every dimension and stride against the slices first.

#![allow(unsafe_code)]

use crate::{Error, Result};

/// A read-only matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix at the start of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of the row-major `cols × rows` matrix at the start of `data`, i.e. a
    /// `rows × cols` view of it read column by column.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }

    fn check(&self, what: &'static str) -> Result<()> {
        check_fits(
            what,
            self.data.len(),
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
    }
}

/// A writable row-major `rows × cols` matrix at the start of `data`.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major `rows × cols` matrix at the start of `data`.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols }
    }
}

/// The largest element offset of a view must lie inside its slice; empty views always fit.
fn check_fits(
    what: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1).checked_mul(row_stride).and_then(|a| {
        (cols - 1)
            .checked_mul(col_stride)
            .and_then(|b| a.checked_add(b))
    });
    match last {
        Some(last)
            if last < len
                && row_stride <= isize::MAX as usize
                && col_stride <= isize::MAX as usize =>
        {
            Ok(())
        }
        _ => Err(Error::kernel(
            "matrix product",
            format!(
                "{what}: a {rows}×{cols} view with strides ({row_stride}, {col_stride}) does not fit \
             in {len} values"
            ),
        )),
    }
}

/// `dst = a · b`, or `dst += a · b` with `accumulate`. Runs on one thread unless `threads > 1`.
pub fn gemm(
    dst: MatMut<'_>,
    accumulate: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    threads: usize,
) -> Result<()> {
    if a.cols != b.rows || dst.rows != a.rows || dst.cols != b.cols {
        return Err(Error::kernel(
            "matrix product",
            format!(
                "matrix product of {}×{} and {}×{} into {}×{}",
                a.rows, a.cols, b.rows, b.cols, dst.rows, dst.cols
            ),
        ));
    }
    a.check("left operand")?;
    b.check("right operand")?;
    check_fits("product", dst.data.len(), dst.rows, dst.cols, dst.cols, 1)?;
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.data[..m * n].fill(0.0);
        }
        return Ok(());
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every view was checked above to address only elements inside its slice, `dst`
    // is a unique borrow that neither operand can alias, all strides fit in isize (checked),
    // and f32 is one of the element types `gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_and_transposes_match_a_plain_loop() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let mut c = vec![f32::NAN; m * n];
        gemm(
            MatMut::rows(&mut c, m, n),
            false,
            Mat::rows(&a, m, k),
            Mat::rows(&b, k, n),
            1,
        )
        .unwrap();
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // bᵀ stored row-major (n × k), read transposed.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        gemm(
            MatMut::rows(&mut c, m, n),
            true,
            Mat::rows(&a, m, k),
            Mat::transposed(&bt, k, n),
            1,
        )
        .unwrap();
        for (x, y) in c.iter().zip(&want) {
            assert!((x - 2.0 * y).abs() < 1e-5);
        }
    }

    /// Every size class and every layout the kernels use agree with a plain triple loop.
    #[test]
    fn every_size_and_layout_matches_a_plain_loop() {
        for (m, k, n) in [
            (50, 8, 8),
            (8, 400, 8),
            (40, 300, 1),
            (3, 1, 5),
            (64, 96, 80),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want = naive(&a, &b, m, k, n);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let lefts = [Mat::rows(&a, m, k), Mat::transposed(&at, m, k)];
            let rights = [Mat::rows(&b, k, n), Mat::transposed(&bt, k, n)];
            for l in lefts {
                for r in rights {
                    let mut c = vec![1.0; m * n];
                    gemm(MatMut::rows(&mut c, m, n), true, l, r, 1).unwrap();
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - 1.0 - y).abs() < 1e-4 * y.abs().max(1.0), "{m}x{k}x{n}");
                    }
                }
            }
        }
    }

    #[test]
    fn views_that_do_not_fit_are_errors() {
        let a = vec![0.0; 6];
        let mut c = vec![0.0; 4];
        let err = gemm(
            MatMut::rows(&mut c, 2, 2),
            false,
            Mat::rows(&a, 2, 4),
            Mat::rows(&a, 4, 2),
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = gemm(
            MatMut::rows(&mut c, 2, 2),
            false,
            Mat::rows(&a, 2, 3),
            Mat::rows(&a, 2, 2),
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("2×3 and 2×2"), "{err}");
    }
}
