//! The fused layer on the CPU: matrix products through [`super::blas`], gates through the
//! vectorised kernels below (compiled for AVX-512, AVX2 and the baseline, picked at run time).
//!
//! Buffers are row-major, one row per packed row: `pre` holds the gate pre-activations (gate
//! order as PyTorch's weights) and, once a step has run, the gate activations; `extra` holds
//! `tanh(c)` for an LSTM and `W_hn h + b_hn` for a GRU. Scratch comes from the thread's
//! [`Work`] pool.

use candle_core::{Device, Tensor};
use multiversion::multiversion;

use super::act::{sigmoid, tanh};
use super::blas::{Mat, MatMut, gemm};
use super::workspace::Work;
use super::{LayerSpec, Steps};
use crate::model::ModelKind;
use crate::{Error, Result};

/// Activations kept for the backward pass.
#[derive(Debug)]
pub(super) struct Saved {
    /// Gate activations, `(total, gates * hidden)`.
    gates: Work,
    /// `tanh(c)` (LSTM) or `W_hn h + b_hn` (GRU), `(total, hidden)`; empty for plain RNNs.
    extra: Work,
    /// The LSTM's cell state at every packed row, `(total, hidden)`.
    pub(super) c: Option<Tensor>,
}

/// The layer's four tensors, sliced out of the flat parameter vector.
struct Weights<'a> {
    w_ih: &'a [f32],
    w_hh: &'a [f32],
    b_ih: &'a [f32],
    b_hh: &'a [f32],
}

fn weights<'a>(spec: &LayerSpec, params: &'a [f32]) -> Result<Weights<'a>> {
    let [w_ih, w_hh, b_ih, b_hh] = spec.ranges().map(|r| {
        params.get(r.clone()).ok_or_else(|| {
            Error::kernel(
                "fused layer",
                format!("parameters {r:?} out of {}", params.len()),
            )
        })
    });
    Ok(Weights {
        w_ih: w_ih?,
        w_hh: w_hh?,
        b_ih: b_ih?,
        b_hh: b_hh?,
    })
}

fn check(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::kernel(
            "fused layer",
            format!("{what} has {got} values, the batch needs {expected}"),
        ))
    }
}

/// The block of `rows` rows of `width` values starting at row `at`.
fn block(buf: &[f32], width: usize, at: usize, rows: usize) -> &[f32] {
    &buf[at * width..(at + rows) * width]
}

fn block_mut(buf: &mut [f32], width: usize, at: usize, rows: usize) -> &mut [f32] {
    &mut buf[at * width..(at + rows) * width]
}

/// The current step's block (writable) and the previous step's (read-only) of one buffer.
/// The two never overlap: a packed batch's steps are disjoint row ranges.
fn cur_and_prev(
    buf: &mut [f32],
    width: usize,
    (at, rows): (usize, usize),
    (prev_at, prev_rows): (usize, usize),
) -> (&mut [f32], &[f32]) {
    if prev_rows == 0 {
        (block_mut(buf, width, at, rows), &[])
    } else if prev_at < at {
        let (before, from) = buf.split_at_mut(at * width);
        (
            &mut from[..rows * width],
            block(before, width, prev_at, prev_rows),
        )
    } else {
        let (before, from) = buf.split_at_mut(prev_at * width);
        (
            block_mut(before, width, at, rows),
            &from[..prev_rows * width],
        )
    }
}

/// Runs the layer forwards; returns h at every packed row, `(total, hidden)`, and, with
/// `train`, what the backward pass needs.
pub(super) fn forward(
    spec: &LayerSpec,
    steps: &Steps,
    x: &[f32],
    params: &[f32],
    train: bool,
    threads: usize,
) -> Result<(Vec<f32>, Option<Saved>)> {
    let (h, g, input) = (spec.hidden, spec.gate_width(), spec.input);
    let total = steps.total();
    check("layer input", x.len(), total * input)?;
    let w = weights(spec, params)?;
    let kind = spec.kind;
    // Biases folded once: b_ih + b_hh, except the GRU's n gate, whose b_hn sits inside r * (..).
    let mut bias: Vec<f32> = w.b_ih.iter().zip(w.b_hh).map(|(a, b)| a + b).collect();
    let b_hn = if kind == ModelKind::Gru {
        bias[2 * h..].copy_from_slice(&w.b_ih[2 * h..]);
        &w.b_hh[2 * h..]
    } else {
        &[]
    };
    // The weights transposed once, so every product below reads its right operand row by row.
    let w_ih_t = transposed(w.w_ih, g, input);
    let w_hh_t = transposed(w.w_hh, g, h);
    let widest = steps.sequences();
    let extra_width = if kind.gates() > 1 { h } else { 0 };
    // Training keeps every step's activations; inference reuses one step's worth.
    let kept_rows = if train { total } else { widest };
    let mut pre = Work::new(kept_rows * g);
    let mut extra = Work::new(kept_rows * extra_width);
    if train {
        gemm(
            MatMut::rows(&mut pre, total, g),
            false,
            Mat::rows(x, total, input),
            Mat::rows(&w_ih_t, input, g),
            threads,
        )?;
    }
    // h becomes the op's output and (training) c a tensor: both leave the pool.
    let mut out_h = Work::for_output(total * h);
    let c_len = if kind == ModelKind::Lstm {
        total * h
    } else {
        0
    };
    let mut out_c = if train {
        Work::for_output(c_len)
    } else {
        Work::new(c_len)
    };
    let mut hg = Work::new(widest * g);
    let zero = vec![0.0f32; g];
    for t in steps.order(spec.reverse) {
        let (rows, at) = (steps.batch_sizes[t], steps.offsets[t]);
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        let kept_at = if train { at } else { 0 };
        let pre_t = block_mut(&mut pre, g, kept_at, rows);
        if !train {
            gemm(
                MatMut::rows(pre_t, rows, g),
                false,
                Mat::rows(block(x, input, at, rows), rows, input),
                Mat::rows(&w_ih_t, input, g),
                threads,
            )?;
        }
        if prev_rows > 0 {
            gemm(
                MatMut::rows(&mut hg[..prev_rows * g], prev_rows, g),
                false,
                Mat::rows(block(&out_h, h, prev_at, prev_rows), prev_rows, h),
                Mat::rows(&w_hh_t, h, g),
                threads,
            )?;
        }
        let hg_t = &hg[..prev_rows * g];
        let (h_t, h_prev) = cur_and_prev(&mut out_h, h, (at, rows), (prev_at, prev_rows));
        let extra_t = block_mut(&mut extra, extra_width, kept_at, rows);
        match kind {
            ModelKind::RnnTanh | ModelKind::RnnRelu => {
                rnn_forward(h, kind == ModelKind::RnnRelu, pre_t, hg_t, &bias, h_t)
            }
            ModelKind::Lstm => {
                let (c_t, c_prev) = cur_and_prev(&mut out_c, h, (at, rows), (prev_at, prev_rows));
                lstm_forward(h, pre_t, hg_t, &bias, c_prev, &zero, c_t, extra_t, h_t)
            }
            ModelKind::Gru => gru_forward(h, pre_t, hg_t, &bias, b_hn, h_prev, &zero, extra_t, h_t),
        }
    }
    let saved = if train {
        let c = (kind == ModelKind::Lstm)
            .then(|| Tensor::from_vec(out_c.into_vec(), (total, h), &Device::Cpu))
            .transpose()?;
        Some(Saved {
            gates: pre,
            extra,
            c,
        })
    } else {
        None
    };
    Ok((out_h.into_vec(), saved))
}

/// What the backward pass reads: the forward's input, parameters, output and saved
/// activations, and the gradient of the loss with respect to the output.
pub(super) struct BackwardInputs<'a> {
    pub x: &'a [f32],
    pub params: &'a [f32],
    pub out: &'a [f32],
    pub grad: &'a [f32],
    pub saved: &'a Saved,
}

/// The gradients with respect to the layer input (when `want_dx`) and to the whole flat
/// parameter vector (zero outside this layer's tensors).
pub(super) fn backward(
    spec: &LayerSpec,
    steps: &Steps,
    inputs: BackwardInputs<'_>,
    want_dx: bool,
    threads: usize,
) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
    let BackwardInputs {
        x,
        params,
        out: out_h,
        grad: grad_h,
        saved,
    } = inputs;
    let (h, g, input) = (spec.hidden, spec.gate_width(), spec.input);
    let total = steps.total();
    let kind = spec.kind;
    check("layer input", x.len(), total * input)?;
    check("layer output", out_h.len(), total * h)?;
    check("output gradient", grad_h.len(), total * h)?;
    check("saved gates", saved.gates.len(), total * g)?;
    let w = weights(spec, params)?;
    let extra_width = if kind.gates() > 1 { h } else { 0 };
    check("saved state", saved.extra.len(), total * extra_width)?;
    let c_guard = saved.c.as_ref().map(Tensor::storage_and_layout);
    let out_c: &[f32] = match &c_guard {
        Some((storage, layout)) => match &**storage {
            candle_core::Storage::Cpu(s) => {
                let all = s.as_slice::<f32>()?;
                let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                    Error::kernel(
                        "fused layer",
                        "the saved cell state is not contiguous".into(),
                    )
                })?;
                &all[start..end]
            }
            _ => {
                return Err(Error::kernel(
                    "fused layer",
                    "the saved cell state left the CPU".into(),
                ));
            }
        },
        None => &[],
    };
    if kind == ModelKind::Lstm {
        check("saved cell state", out_c.len(), total * h)?;
    }

    // Gradients of the gate pre-activations: input side, and (GRU only) hidden side, where the
    // n gate's product is scaled by r.
    let mut dg = Work::new(total * g);
    let mut dg_hidden = Work::new(if kind == ModelKind::Gru { total * g } else { 0 });
    // Gradient flowing into each running row's state from the step processed before.
    let widest = steps.sequences();
    let mut carry_h = Work::zeroed(widest * h);
    let mut carry_c = Work::zeroed(if kind == ModelKind::Lstm {
        widest * h
    } else {
        0
    });
    let zero = vec![0.0f32; h];
    for t in steps.order(!spec.reverse) {
        let (rows, at) = (steps.batch_sizes[t], steps.offsets[t]);
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        let dg_t = block_mut(&mut dg, g, at, rows);
        let grad_t = block(grad_h, h, at, rows);
        let gates_t = block(&saved.gates, g, at, rows);
        match kind {
            ModelKind::RnnTanh | ModelKind::RnnRelu => rnn_backward(
                kind == ModelKind::RnnRelu,
                grad_t,
                &carry_h[..rows * h],
                block(out_h, h, at, rows),
                dg_t,
            ),
            ModelKind::Lstm => lstm_backward(
                h,
                LstmGrads {
                    grad_h: grad_t,
                    carry_h: &carry_h[..rows * h],
                    carry_c: &mut carry_c[..rows * h],
                },
                gates_t,
                block(&saved.extra, h, at, rows),
                block(out_c, h, prev_at, prev_rows),
                &zero,
                dg_t,
            ),
            ModelKind::Gru => gru_backward(
                h,
                grad_t,
                &mut carry_h[..rows * h],
                gates_t,
                block(&saved.extra, h, at, rows),
                block(out_h, h, prev_at, prev_rows),
                &zero,
                dg_t,
                block_mut(&mut dg_hidden, g, at, rows),
            ),
        }
        if prev_rows > 0 {
            let dgh = if kind == ModelKind::Gru {
                &dg_hidden
            } else {
                &dg
            };
            gemm(
                MatMut::rows(&mut carry_h[..prev_rows * h], prev_rows, h),
                kind == ModelKind::Gru,
                Mat::rows(block(dgh, g, at, prev_rows), prev_rows, g),
                Mat::rows(w.w_hh, g, h),
                threads,
            )?;
        }
    }

    // Each packed row's previous state (zeros where a sequence starts), for dW_hh in one product.
    let mut h_prev_all = Work::new(total * h);
    for t in 0..steps.batch_sizes.len() {
        let (rows, at) = (steps.batch_sizes[t], steps.offsets[t]);
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        let dst = block_mut(&mut h_prev_all, h, at, rows);
        let (with_prev, fresh) = dst.split_at_mut(prev_rows * h);
        with_prev.copy_from_slice(block(out_h, h, prev_at, prev_rows));
        fresh.fill(0.0);
    }
    let dgh = if kind == ModelKind::Gru {
        &dg_hidden
    } else {
        &dg
    };
    let p = spec.params;
    let mut dparams = vec![0.0f32; spec.param_len];
    gemm(
        MatMut::rows(&mut dparams[p.w_ih..p.w_ih + g * input], g, input),
        false,
        Mat::transposed(&dg, g, total),
        Mat::rows(x, total, input),
        threads,
    )?;
    gemm(
        MatMut::rows(&mut dparams[p.w_hh..p.w_hh + g * h], g, h),
        false,
        Mat::transposed(dgh, g, total),
        Mat::rows(&h_prev_all, total, h),
        threads,
    )?;
    column_sums(&dg, &mut dparams[p.b_ih..p.b_ih + g]);
    column_sums(dgh, &mut dparams[p.b_hh..p.b_hh + g]);
    let dx = if want_dx {
        let mut dx = Work::for_output(total * input);
        gemm(
            MatMut::rows(&mut dx, total, input),
            false,
            Mat::rows(&dg, total, g),
            Mat::rows(w.w_ih, g, input),
            threads,
        )?;
        Some(dx.into_vec())
    } else {
        None
    };
    Ok((dx, dparams))
}

/// The transpose of a row-major `rows × cols` matrix, row-major `cols × rows`.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Work {
    let mut t = Work::new(rows * cols);
    for (r, row) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// `out[j] = sum_r m[r, j]` for a row-major matrix with `out.len()` columns. Narrow matrices
/// are summed several rows at a time, so the additions vectorise whatever the width.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn column_sums(m: &[f32], out: &mut [f32]) {
    const SPAN: usize = 64;
    let width = out.len();
    let group = (SPAN / width).max(1);
    let mut acc = vec![0.0f32; group * width];
    let mut chunks = m.chunks_exact(group * width);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += v;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v;
    }
    out.fill(0.0);
    for part in acc.chunks_exact(width) {
        for (o, v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
}

// ---- Gate kernels. Each `*_forward`/`*_backward` walks one step's block of rows; rows at or
// ---- beyond `prev` have no previous state (their recurrent product and previous h/c are
// ---- zero). The arithmetic of one row is a `*_row` function compiled for AVX-512, AVX2 and
// ---- the baseline and picked at run time; each slice is its own argument, so the compiler
// ---- knows none overlaps another and vectorises the row without run-time checks.

/// `h = act(pre + bias + hg)` for RNN cells. The sums go row by row; the activation runs over
/// the whole block at once, so it vectorises however small `h` is.
fn rnn_forward(h: usize, relu: bool, pre: &[f32], hg: &[f32], bias: &[f32], out: &mut [f32]) {
    let bias = &bias[..h];
    for (r, (o, a)) in out.chunks_exact_mut(h).zip(pre.chunks_exact(h)).enumerate() {
        match hg.get(r * h..(r + 1) * h) {
            Some(p) => {
                for (((o, a), b), p) in o.iter_mut().zip(a).zip(bias).zip(p) {
                    *o = a + b + p;
                }
            }
            None => {
                for ((o, a), b) in o.iter_mut().zip(a).zip(bias) {
                    *o = a + b;
                }
            }
        }
    }
    rnn_activation(relu, out);
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn rnn_activation(relu: bool, xs: &mut [f32]) {
    if relu {
        // NaN stays NaN, so a diverged model is noticed.
        for v in xs.iter_mut() {
            *v = if *v < 0.0 { 0.0 } else { *v };
        }
    } else {
        for v in xs.iter_mut() {
            *v = tanh(*v);
        }
    }
}

/// LSTM: gates (i, f, g, o) to activations in place, `c = f c' + i g`, `h = o tanh(c)`.
#[allow(clippy::too_many_arguments)]
fn lstm_forward(
    h: usize,
    pre: &mut [f32],
    hg: &[f32],
    bias: &[f32],
    c_prev: &[f32],
    zero: &[f32],
    c: &mut [f32],
    tanh_c: &mut [f32],
    out: &mut [f32],
) {
    let g = 4 * h;
    let b = gate_blocks::<4>(&bias[..g], h);
    let rows = out.len() / h;
    for r in 0..rows {
        let (hg_r, cp) = match (hg.get(r * g..(r + 1) * g), c_prev.get(r * h..(r + 1) * h)) {
            (Some(a), Some(b)) => (a, b),
            _ => (&zero[..g], &zero[..h]),
        };
        lstm_row(
            gate_blocks_mut::<4>(&mut pre[r * g..(r + 1) * g], h),
            gate_blocks::<4>(hg_r, h),
            b,
            cp,
            [
                &mut c[r * h..(r + 1) * h],
                &mut tanh_c[r * h..(r + 1) * h],
                &mut out[r * h..(r + 1) * h],
            ],
        );
    }
}

/// Splits a row of `N * h` gate values into its `N` gates.
fn gate_blocks<const N: usize>(row: &[f32], h: usize) -> [&[f32]; N] {
    std::array::from_fn(|k| &row[k * h..(k + 1) * h])
}

fn gate_blocks_mut<const N: usize>(row: &mut [f32], h: usize) -> [&mut [f32]; N] {
    let mut rest = row;
    std::array::from_fn(|_| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(h);
        rest = tail;
        head
    })
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn lstm_row(
    [gi, gf, gg, go]: [&mut [f32]; 4],
    [hi, hf, hg, ho]: [&[f32]; 4],
    [bi, bf, bg, bo]: [&[f32]; 4],
    c_prev: &[f32],
    [c, tanh_c, out]: [&mut [f32]; 3],
) {
    let h = out.len();
    let (gi, gf, gg, go) = (&mut gi[..h], &mut gf[..h], &mut gg[..h], &mut go[..h]);
    let (hi, hf, hg, ho, c_prev) = (&hi[..h], &hf[..h], &hg[..h], &ho[..h], &c_prev[..h]);
    let (bi, bf, bg, bo) = (&bi[..h], &bf[..h], &bg[..h], &bo[..h]);
    let (c, tanh_c) = (&mut c[..h], &mut tanh_c[..h]);
    for j in 0..h {
        let i = sigmoid(gi[j] + bi[j] + hi[j]);
        let f = sigmoid(gf[j] + bf[j] + hf[j]);
        let gv = tanh(gg[j] + bg[j] + hg[j]);
        let o = sigmoid(go[j] + bo[j] + ho[j]);
        let cv = f * c_prev[j] + i * gv;
        let t = tanh(cv);
        gi[j] = i;
        gf[j] = f;
        gg[j] = gv;
        go[j] = o;
        c[j] = cv;
        tanh_c[j] = t;
        out[j] = o * t;
    }
}

/// GRU: `r, z = σ(..)`, `hn = W_hn h + b_hn`, `n = tanh(W_in x + b_in + r hn)`,
/// `h = n + z (h' - n)`; gates (r, z, n) to activations in place, `hn` kept.
#[allow(clippy::too_many_arguments)]
fn gru_forward(
    h: usize,
    pre: &mut [f32],
    hg: &[f32],
    bias: &[f32],
    b_hn: &[f32],
    h_prev: &[f32],
    zero: &[f32],
    hn_out: &mut [f32],
    out: &mut [f32],
) {
    let g = 3 * h;
    let b = gate_blocks::<3>(&bias[..g], h);
    let rows = out.len() / h;
    for r in 0..rows {
        let (hg_r, hp) = match (hg.get(r * g..(r + 1) * g), h_prev.get(r * h..(r + 1) * h)) {
            (Some(a), Some(b)) => (a, b),
            _ => (&zero[..g], &zero[..h]),
        };
        gru_row(
            gate_blocks_mut::<3>(&mut pre[r * g..(r + 1) * g], h),
            gate_blocks::<3>(hg_r, h),
            b,
            [b_hn, hp],
            [
                &mut hn_out[r * h..(r + 1) * h],
                &mut out[r * h..(r + 1) * h],
            ],
        );
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn gru_row(
    [gr, gz, gn]: [&mut [f32]; 3],
    [hr, hz, hn_in]: [&[f32]; 3],
    [br, bz, bn]: [&[f32]; 3],
    [b_hn, h_prev]: [&[f32]; 2],
    [hn_out, out]: [&mut [f32]; 2],
) {
    let h = out.len();
    let (gr, gz, gn, hn_out) = (&mut gr[..h], &mut gz[..h], &mut gn[..h], &mut hn_out[..h]);
    let (hr, hz, hn_in, h_prev) = (&hr[..h], &hz[..h], &hn_in[..h], &h_prev[..h]);
    let (br, bz, bn, b_hn) = (&br[..h], &bz[..h], &bn[..h], &b_hn[..h]);
    for j in 0..h {
        let r = sigmoid(gr[j] + br[j] + hr[j]);
        let z = sigmoid(gz[j] + bz[j] + hz[j]);
        let hn = hn_in[j] + b_hn[j];
        let n = tanh(gn[j] + bn[j] + r * hn);
        gr[j] = r;
        gz[j] = z;
        gn[j] = n;
        hn_out[j] = hn;
        out[j] = n + z * (h_prev[j] - n);
    }
}

/// RNN: `dpre = (grad + carry) * act'`, from the output h, over the whole block at once.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn rnn_backward(relu: bool, grad: &[f32], carry: &[f32], out: &[f32], dg: &mut [f32]) {
    let n = dg.len();
    let (grad, carry, out) = (&grad[..n], &carry[..n], &out[..n]);
    if relu {
        for j in 0..n {
            dg[j] = if out[j] > 0.0 {
                grad[j] + carry[j]
            } else {
                0.0
            };
        }
    } else {
        for j in 0..n {
            dg[j] = (grad[j] + carry[j]) * (1.0 - out[j] * out[j]);
        }
    }
}

/// The gradients reaching one LSTM step from the loss and from the step after it.
struct LstmGrads<'a> {
    grad_h: &'a [f32],
    carry_h: &'a [f32],
    /// In: dL/dc from the next step; out: dL/dc' for the previous step (`dc * f`).
    carry_c: &'a mut [f32],
}

fn lstm_backward(
    h: usize,
    grads: LstmGrads<'_>,
    gates: &[f32],
    tanh_c: &[f32],
    c_prev: &[f32],
    zero: &[f32],
    dg: &mut [f32],
) {
    let LstmGrads {
        grad_h,
        carry_h,
        carry_c,
    } = grads;
    let g = 4 * h;
    for (r, d) in dg.chunks_exact_mut(g).enumerate() {
        let span = r * h..(r + 1) * h;
        lstm_backward_row(
            [
                &grad_h[span.clone()],
                &carry_h[span.clone()],
                &tanh_c[span.clone()],
                c_prev.get(span.clone()).unwrap_or(&zero[..h]),
            ],
            &mut carry_c[span],
            gate_blocks::<4>(&gates[r * g..(r + 1) * g], h),
            gate_blocks_mut::<4>(d, h),
        );
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn lstm_backward_row(
    [grad_h, carry_h, tanh_c, c_prev]: [&[f32]; 4],
    carry_c: &mut [f32],
    [ai, af, ag, ao]: [&[f32]; 4],
    [di, df, dgg, d_o]: [&mut [f32]; 4],
) {
    let h = carry_c.len();
    let (grad_h, carry_h) = (&grad_h[..h], &carry_h[..h]);
    let (tanh_c, c_prev) = (&tanh_c[..h], &c_prev[..h]);
    let (ai, af, ag, ao) = (&ai[..h], &af[..h], &ag[..h], &ao[..h]);
    let (di, df, dgg, d_o) = (&mut di[..h], &mut df[..h], &mut dgg[..h], &mut d_o[..h]);
    for j in 0..h {
        let (i, f, gv, o, t) = (ai[j], af[j], ag[j], ao[j], tanh_c[j]);
        let dh = grad_h[j] + carry_h[j];
        let dc = carry_c[j] + dh * o * (1.0 - t * t);
        di[j] = dc * gv * i * (1.0 - i);
        df[j] = dc * c_prev[j] * f * (1.0 - f);
        dgg[j] = dc * i * (1.0 - gv * gv);
        d_o[j] = dh * t * o * (1.0 - o);
        carry_c[j] = dc * f;
    }
}

/// GRU: gate gradients on the input side (`dg`) and the hidden side (`dg_hidden`, whose n part
/// is scaled by r); `carry` turns from dL/dh into the direct part of dL/dh' (`dh * z`).
#[allow(clippy::too_many_arguments)]
fn gru_backward(
    h: usize,
    grad: &[f32],
    carry: &mut [f32],
    gates: &[f32],
    hn: &[f32],
    h_prev: &[f32],
    zero: &[f32],
    dg: &mut [f32],
    dg_hidden: &mut [f32],
) {
    let g = 3 * h;
    for (r, (d, dh)) in dg
        .chunks_exact_mut(g)
        .zip(dg_hidden.chunks_exact_mut(g))
        .enumerate()
    {
        let span = r * h..(r + 1) * h;
        gru_backward_row(
            [
                &grad[span.clone()],
                &hn[span.clone()],
                h_prev.get(span.clone()).unwrap_or(&zero[..h]),
            ],
            &mut carry[span],
            gate_blocks::<3>(&gates[r * g..(r + 1) * g], h),
            gate_blocks_mut::<3>(d, h),
            gate_blocks_mut::<3>(dh, h),
        );
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn gru_backward_row(
    [grad, hn, h_prev]: [&[f32]; 3],
    carry: &mut [f32],
    [ar, az, an]: [&[f32]; 3],
    [dr, dz, dn]: [&mut [f32]; 3],
    [hr, hz, hnn]: [&mut [f32]; 3],
) {
    let h = carry.len();
    let (grad, hn, h_prev) = (&grad[..h], &hn[..h], &h_prev[..h]);
    let (ar, az, an) = (&ar[..h], &az[..h], &an[..h]);
    let (dr, dz, dn) = (&mut dr[..h], &mut dz[..h], &mut dn[..h]);
    let (hr, hz, hnn) = (&mut hr[..h], &mut hz[..h], &mut hnn[..h]);
    for j in 0..h {
        let (r, z, n) = (ar[j], az[j], an[j]);
        let dh = grad[j] + carry[j];
        let dn_pre = dh * (1.0 - z) * (1.0 - n * n);
        let dr_pre = dn_pre * hn[j] * r * (1.0 - r);
        let dz_pre = dh * (h_prev[j] - n) * z * (1.0 - z);
        dr[j] = dr_pre;
        dz[j] = dz_pre;
        dn[j] = dn_pre;
        hr[j] = dr_pre;
        hz[j] = dz_pre;
        hnn[j] = dn_pre * r;
        carry[j] = dh * z;
    }
}
