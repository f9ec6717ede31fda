//! The fused layer on the CPU: matrix products through [`super::blas`], gates through the
//! vectorised kernels below (compiled for AVX-512, AVX2 and the baseline, picked at run time).
//!
//! Buffers are row-major, one row per packed row: `pre` holds the gate pre-activations (gate
//! order as PyTorch's weights) and, once a step has run, the gate activations; `extra` holds
//! `tanh(c)` for an LSTM and `W_hn h + b_hn` for a GRU.

use multiversion::multiversion;

use super::act::{sigmoid, tanh};
use super::blas::{Mat, MatMut, gemm};
use super::{LayerSpec, Steps};
use crate::model::ModelKind;
use crate::{Error, Result};

/// Activations kept for the backward pass.
#[derive(Debug)]
pub(super) struct Saved {
    /// Gate activations, `(total, gates * hidden)`.
    gates: Vec<f32>,
    /// `tanh(c)` (LSTM) or `W_hn h + b_hn` (GRU), `(total, hidden)`; empty for plain RNNs.
    extra: Vec<f32>,
}

/// The layer's four tensors, sliced out of the flat parameter vector.
struct Weights<'a> {
    w_ih: &'a [f32],
    w_hh: &'a [f32],
    b_ih: &'a [f32],
    b_hh: &'a [f32],
}

fn weights<'a>(spec: &LayerSpec, params: &'a [f32]) -> Result<Weights<'a>> {
    let g = spec.gate_width();
    let p = spec.params;
    let get = |start: usize, len: usize| {
        params.get(start..start + len).ok_or_else(|| {
            Error::Kernel(format!(
                "parameters {start}..{} out of {}",
                start + len,
                params.len()
            ))
        })
    };
    Ok(Weights {
        w_ih: get(p.w_ih, g * spec.input)?,
        w_hh: get(p.w_hh, g * spec.hidden)?,
        b_ih: get(p.b_ih, g)?,
        b_hh: get(p.b_hh, g)?,
    })
}

fn check(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Kernel(format!(
            "{what} has {got} values, the batch needs {expected}"
        )))
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

/// Runs the layer forwards; returns the output `(planes * total, hidden)` and, with `train`,
/// what the backward pass needs.
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
    let widest = steps.sequences();
    let extra_width = if kind.gates() > 1 { h } else { 0 };
    // Training keeps every step's activations; inference reuses one step's worth.
    let kept_rows = if train { total } else { widest };
    let mut pre = vec![0.0f32; kept_rows * g];
    let mut extra = vec![0.0f32; kept_rows * extra_width];
    if train {
        gemm(
            MatMut::rows(&mut pre, total, g),
            false,
            Mat::rows(x, total, input),
            Mat::transposed(w.w_ih, input, g),
            threads,
        )?;
    }
    let mut out = vec![0.0f32; spec.planes() * total * h];
    let (out_h, out_c) = out.split_at_mut(total * h);
    let mut hg = vec![0.0f32; widest * g];
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
                Mat::transposed(w.w_ih, input, g),
                threads,
            )?;
        }
        if prev_rows > 0 {
            gemm(
                MatMut::rows(&mut hg[..prev_rows * g], prev_rows, g),
                false,
                Mat::rows(block(out_h, h, prev_at, prev_rows), prev_rows, h),
                Mat::transposed(w.w_hh, h, g),
                threads,
            )?;
        }
        let hg_t = &hg[..prev_rows * g];
        let (h_t, h_prev) = cur_and_prev(out_h, h, (at, rows), (prev_at, prev_rows));
        let extra_t = block_mut(&mut extra, extra_width, kept_at, rows);
        match kind {
            ModelKind::RnnTanh | ModelKind::RnnRelu => rnn_forward(
                h,
                kind == ModelKind::RnnRelu,
                pre_t,
                hg_t,
                &bias,
                h_t,
            ),
            ModelKind::Lstm => {
                let (c_t, c_prev) = cur_and_prev(out_c, h, (at, rows), (prev_at, prev_rows));
                lstm_forward(h, pre_t, hg_t, &bias, c_prev, &zero, c_t, extra_t, h_t)
            }
            ModelKind::Gru => gru_forward(
                h, pre_t, hg_t, &bias, b_hn, h_prev, &zero, extra_t, h_t,
            ),
        }
    }
    let saved = train.then_some(Saved { gates: pre, extra });
    Ok((out, saved))
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
        out,
        grad,
        saved,
    } = inputs;
    let (h, g, input) = (spec.hidden, spec.gate_width(), spec.input);
    let total = steps.total();
    let kind = spec.kind;
    check("layer input", x.len(), total * input)?;
    check("layer output", out.len(), spec.planes() * total * h)?;
    check("output gradient", grad.len(), spec.planes() * total * h)?;
    check("saved gates", saved.gates.len(), total * g)?;
    let w = weights(spec, params)?;
    let (out_h, out_c) = out.split_at(total * h);
    let (grad_h, grad_c) = grad.split_at(total * h);
    let extra_width = if kind.gates() > 1 { h } else { 0 };
    check("saved state", saved.extra.len(), total * extra_width)?;

    // Gradients of the gate pre-activations: input side, and (GRU only) hidden side, where the
    // n gate's product is scaled by r.
    let mut dg = vec![0.0f32; total * g];
    let mut dg_hidden = if kind == ModelKind::Gru {
        vec![0.0f32; total * g]
    } else {
        Vec::new()
    };
    // Gradient flowing into each running row's state from the step processed before.
    let widest = steps.sequences();
    let mut carry_h = vec![0.0f32; widest * h];
    let mut carry_c = vec![0.0f32; if kind == ModelKind::Lstm { widest * h } else { 0 }];
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
                    grad_c: block(grad_c, h, at, rows),
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
            let dgh = if kind == ModelKind::Gru { &dg_hidden } else { &dg };
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
    let mut h_prev_all = vec![0.0f32; total * h];
    for t in 0..steps.batch_sizes.len() {
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        block_mut(&mut h_prev_all, h, steps.offsets[t], prev_rows)
            .copy_from_slice(block(out_h, h, prev_at, prev_rows));
    }
    let dgh = if kind == ModelKind::Gru { &dg_hidden } else { &dg };
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
        let mut dx = vec![0.0f32; total * input];
        gemm(
            MatMut::rows(&mut dx, total, input),
            false,
            Mat::rows(&dg, total, g),
            Mat::rows(w.w_ih, g, input),
            threads,
        )?;
        Some(dx)
    } else {
        None
    };
    Ok((dx, dparams))
}

/// `out[j] = sum_r m[r, j]` for a row-major matrix with `out.len()` columns.
fn column_sums(m: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for row in m.chunks_exact(out.len()) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

// ---- Gate kernels. Each handles one step's block of rows; rows at or beyond `prev` rows
// ---- have no previous state (their recurrent product and previous h/c are zero).

/// `h = act(pre + bias + hg)` for RNN cells.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn rnn_forward(h: usize, relu: bool, pre: &[f32], hg: &[f32], bias: &[f32], out: &mut [f32]) {
    let bias = &bias[..h];
    for (r, (o, a)) in out.chunks_exact_mut(h).zip(pre.chunks_exact(h)).enumerate() {
        match hg.get(r * h..(r + 1) * h) {
            Some(p) => {
                for j in 0..h {
                    o[j] = a[j] + bias[j] + p[j];
                }
            }
            None => {
                for j in 0..h {
                    o[j] = a[j] + bias[j];
                }
            }
        }
        if relu {
            // NaN stays NaN, so a diverged model is noticed.
            for v in o.iter_mut() {
                *v = if *v < 0.0 { 0.0 } else { *v };
            }
        } else {
            for v in o.iter_mut() {
                *v = tanh(*v);
            }
        }
    }
}

/// LSTM: gates (i, f, g, o) to activations in place, `c = f c' + i g`, `h = o tanh(c)`.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
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
    let (bi, rest) = bias[..g].split_at(h);
    let (bf, rest) = rest.split_at(h);
    let (bg, bo) = rest.split_at(h);
    let rows = out.len() / h;
    for r in 0..rows {
        let (hg_r, cp) = match (hg.get(r * g..(r + 1) * g), c_prev.get(r * h..(r + 1) * h)) {
            (Some(a), Some(b)) => (a, b),
            _ => (&zero[..g], &zero[..h]),
        };
        let (gi, rest) = pre[r * g..(r + 1) * g].split_at_mut(h);
        let (gf, rest) = rest.split_at_mut(h);
        let (gg, go) = rest.split_at_mut(h);
        let (hi, rest) = hg_r.split_at(h);
        let (hf, rest) = rest.split_at(h);
        let (hgg, ho) = rest.split_at(h);
        let c_r = &mut c[r * h..(r + 1) * h];
        let tc_r = &mut tanh_c[r * h..(r + 1) * h];
        let o_r = &mut out[r * h..(r + 1) * h];
        for j in 0..h {
            let i = sigmoid(gi[j] + bi[j] + hi[j]);
            let f = sigmoid(gf[j] + bf[j] + hf[j]);
            let gv = tanh(gg[j] + bg[j] + hgg[j]);
            let o = sigmoid(go[j] + bo[j] + ho[j]);
            let cv = f * cp[j] + i * gv;
            let tc = tanh(cv);
            gi[j] = i;
            gf[j] = f;
            gg[j] = gv;
            go[j] = o;
            c_r[j] = cv;
            tc_r[j] = tc;
            o_r[j] = o * tc;
        }
    }
}

/// GRU: `r, z = σ(..)`, `hn = W_hn h + b_hn`, `n = tanh(W_in x + b_in + r hn)`,
/// `h = n + z (h' - n)`; gates (r, z, n) to activations in place, `hn` kept.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
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
    let (br, rest) = bias[..g].split_at(h);
    let (bz, bn) = rest.split_at(h);
    let b_hn = &b_hn[..h];
    let rows = out.len() / h;
    for r in 0..rows {
        let (hg_r, hp) = match (hg.get(r * g..(r + 1) * g), h_prev.get(r * h..(r + 1) * h)) {
            (Some(a), Some(b)) => (a, b),
            _ => (&zero[..g], &zero[..h]),
        };
        let (gr, rest) = pre[r * g..(r + 1) * g].split_at_mut(h);
        let (gz, gn) = rest.split_at_mut(h);
        let (hr, rest) = hg_r.split_at(h);
        let (hz, hnn) = rest.split_at(h);
        let hn_r = &mut hn_out[r * h..(r + 1) * h];
        let o_r = &mut out[r * h..(r + 1) * h];
        for j in 0..h {
            let rv = sigmoid(gr[j] + br[j] + hr[j]);
            let zv = sigmoid(gz[j] + bz[j] + hz[j]);
            let hn = hnn[j] + b_hn[j];
            let n = tanh(gn[j] + bn[j] + rv * hn);
            gr[j] = rv;
            gz[j] = zv;
            gn[j] = n;
            hn_r[j] = hn;
            o_r[j] = n + zv * (hp[j] - n);
        }
    }
}

/// RNN: `dpre = (grad + carry) * act'`, from the output h.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn rnn_backward(relu: bool, grad: &[f32], carry: &[f32], out: &[f32], dg: &mut [f32]) {
    let n = dg.len();
    let (grad, carry, out) = (&grad[..n], &carry[..n], &out[..n]);
    if relu {
        for e in 0..n {
            dg[e] = if out[e] > 0.0 { grad[e] + carry[e] } else { 0.0 };
        }
    } else {
        for e in 0..n {
            let y = out[e];
            dg[e] = (grad[e] + carry[e]) * (1.0 - y * y);
        }
    }
}

/// The gradients reaching one LSTM step from the loss and from the step after it.
struct LstmGrads<'a> {
    grad_h: &'a [f32],
    grad_c: &'a [f32],
    carry_h: &'a [f32],
    /// In: dL/dc from the next step; out: dL/dc' for the previous step (`dc * f`).
    carry_c: &'a mut [f32],
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
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
        grad_c,
        carry_h,
        carry_c,
    } = grads;
    let g = 4 * h;
    let rows = grad_h.len() / h;
    for r in 0..rows {
        let cp = c_prev.get(r * h..(r + 1) * h).unwrap_or(&zero[..h]);
        let span = r * h..(r + 1) * h;
        let (gh, gc, ch) = (
            &grad_h[span.clone()],
            &grad_c[span.clone()],
            &carry_h[span.clone()],
        );
        let cc = &mut carry_c[span.clone()];
        let tc = &tanh_c[span];
        let (ai, rest) = gates[r * g..(r + 1) * g].split_at(h);
        let (af, rest) = rest.split_at(h);
        let (ag, ao) = rest.split_at(h);
        let (di, rest) = dg[r * g..(r + 1) * g].split_at_mut(h);
        let (df, rest) = rest.split_at_mut(h);
        let (dgg, d_o) = rest.split_at_mut(h);
        for j in 0..h {
            let (i, f, gv, o, t) = (ai[j], af[j], ag[j], ao[j], tc[j]);
            let dh = gh[j] + ch[j];
            let dc = gc[j] + cc[j] + dh * o * (1.0 - t * t);
            di[j] = dc * gv * i * (1.0 - i);
            df[j] = dc * cp[j] * f * (1.0 - f);
            dgg[j] = dc * i * (1.0 - gv * gv);
            d_o[j] = dh * t * o * (1.0 - o);
            cc[j] = dc * f;
        }
    }
}

/// GRU: gate gradients on the input side (`dg`) and the hidden side (`dg_hidden`, whose n part
/// is scaled by r); `carry` turns from dL/dh into the direct part of dL/dh' (`dh * z`).
#[allow(clippy::too_many_arguments)]
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
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
    let rows = grad.len() / h;
    for r in 0..rows {
        let hp = h_prev.get(r * h..(r + 1) * h).unwrap_or(&zero[..h]);
        let span = r * h..(r + 1) * h;
        let gr_ = &grad[span.clone()];
        let cr = &mut carry[span.clone()];
        let hn_r = &hn[span];
        let (ar, rest) = gates[r * g..(r + 1) * g].split_at(h);
        let (az, an) = rest.split_at(h);
        let (dr, rest) = dg[r * g..(r + 1) * g].split_at_mut(h);
        let (dz, dn) = rest.split_at_mut(h);
        let (hr, rest) = dg_hidden[r * g..(r + 1) * g].split_at_mut(h);
        let (hz, hnn) = rest.split_at_mut(h);
        for j in 0..h {
            let (rv, zv, n) = (ar[j], az[j], an[j]);
            let dh = gr_[j] + cr[j];
            let dn_pre = dh * (1.0 - zv) * (1.0 - n * n);
            let dr_pre = dn_pre * hn_r[j] * rv * (1.0 - rv);
            let dz_pre = dh * (hp[j] - n) * zv * (1.0 - zv);
            dr[j] = dr_pre;
            dz[j] = dz_pre;
            dn[j] = dn_pre;
            hr[j] = dr_pre;
            hz[j] = dz_pre;
            hnn[j] = dn_pre * rv;
            cr[j] = dh * zv;
        }
    }
}
