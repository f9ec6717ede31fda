//! The CUDA backend of the fused ops, and its one unsafe module: cuBLAS (through candle's
//! handle, on candle's stream) for the matrix products and the gate kernels of `kernels.cu`.
//!
//! The kernels are compiled at run time with nvrtc, once per process (a worker does it when it
//! opens its device, so a broken toolkit shows at start), and the driver turns the PTX into
//! code for whatever GPU the worker finds. Like candle's own kernels, the PTX needs a driver at
//! least as new as the nvrtc that made it: build and ship against the oldest driver you run.
//! CI compiles the same source with nvcc and with nvrtc, so it cannot rot unnoticed.
//!
//! Every product goes through [`gemm`], which checks each operand's extent against its buffer
//! before cuBLAS sees a pointer; every size a kernel gets is checked to fit its `i32`, and the
//! kernels index with 64-bit integers.

#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Layout, Storage, Tensor};

use super::head::HeadSpec;
use super::{LayerSpec, Steps};
use crate::model::ModelKind;
use crate::{Error, Result};

/// The gate kernels' source; see the module docs.
pub(super) const SOURCE: &str = include_str!("kernels.cu");
const MODULE: &str = "recur_fused";

/// Activations kept for the backward pass (device buffers).
#[derive(Debug)]
pub(super) struct Saved {
    gates: CudaSlice<f32>,
    extra: CudaSlice<f32>,
    /// The LSTM's cell state at every packed row, `(total, hidden)`.
    pub(super) c: Option<Tensor>,
}

/// The PTX of [`SOURCE`], compiled once per process.
pub(super) fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let start = std::time::Instant::now();
        let ptx = nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string());
        tracing::debug!(
            ok = ptx.is_ok(),
            ms = start.elapsed().as_secs_f64() * 1e3,
            "compiled the CUDA gate kernels with nvrtc"
        );
        ptx
    })
    .as_deref()
    .map_err(|e| {
        Error::kernel(
            "CUDA",
            format!("compiling the CUDA gate kernels with nvrtc: {e}"),
        )
    })
}

fn cuda_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::kernel("CUDA", format!("{what}: {e}"))
}

/// An element count as a kernel argument.
fn int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| Error::kernel("CUDA", format!("{what} ({n}) is too large for a kernel")))
}

/// A launch of one thread per element.
fn launch_for(n: usize) -> Result<LaunchConfig> {
    let n =
        u32::try_from(n).map_err(|_| Error::kernel("CUDA", format!("{n} threads is too many")))?;
    Ok(LaunchConfig::for_num_elems(n.max(1)))
}

/// The storage's values a contiguous layout addresses.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::kernel("CUDA", format!("{what} is not contiguous")))?;
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// `dst (m × n) = a · b`, or `+=` with `accumulate`, all row-major; `a_t` says `a` is stored as
/// its transpose (`k × m`), `b_t` the same for `b` (`n × k`).
#[allow(clippy::too_many_arguments)]
fn gemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    a: &A,
    a_t: bool,
    b: &B,
    b_t: bool,
    dst: &mut C,
    accumulate: bool,
) -> Result<()> {
    for (what, have, need) in [
        ("left operand", a.len(), m * k),
        ("right operand", b.len(), k * n),
        ("product", dst.len(), m * n),
    ] {
        if have < need {
            return Err(Error::kernel(
                "CUDA",
                format!("{what} of a {m}×{k} by {k}×{n} product has {have} values, needs {need}"),
            ));
        }
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dev.cuda_stream()
                .memset_zeros(dst)
                .map_err(|e| cuda_err("clearing a product", e))?;
        }
        return Ok(());
    }
    let (mi, ni, ki) = (int(m, "rows")?, int(n, "columns")?, int(k, "depth")?);
    // Row-major C = A B is column-major Cᵀ = Bᵀ Aᵀ: cuBLAS multiplies b by a.
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let cfg = GemmConfig {
        transa: op(b_t),
        transb: op(a_t),
        m: ni,
        n: mi,
        k: ki,
        alpha: 1.0f32,
        lda: if b_t { ki } else { ni },
        ldb: if a_t { mi } else { ki },
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: ni,
    };
    // SAFETY: every operand was checked above to hold at least the elements this
    // configuration addresses (leading dimensions equal the row lengths of dense row-major
    // storage), all three live on the device whose stream the handle uses, and `dst` is a
    // unique borrow.
    unsafe { dev.cublas_handle().gemm(cfg, b, a, dst) }.map_err(|e| cuda_err("cuBLAS sgemm", e))
}

/// Launches kernel `$name` of [`SOURCE`] with one thread per element of `$n`.
macro_rules! launch {
    ($dev:expr, $name:expr, $n:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
        let cfg = launch_for($n)?;
        let mut b = func.builder();
        $( b.arg($arg); )+
        // SAFETY: every call site passes the arguments of the kernel's signature in kernels.cu
        // (f32 buffers, then i32 sizes), each buffer allocated or checked by the caller to hold
        // what the kernel indexes for those sizes; the kernels return early past `$n`.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| cuda_err($name, e))
    }};
}

/// `n` zeros on the device (one when `n` is 0: a buffer a kernel gets but never reads).
fn zeros(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    Ok(dev.alloc_zeros::<f32>(n.max(1))?)
}

/// The layer's four parameter tensors as views of the flat vector.
struct Weights<'a> {
    w_ih: CudaView<'a, f32>,
    w_hh: CudaView<'a, f32>,
    b_ih: CudaView<'a, f32>,
    b_hh: CudaView<'a, f32>,
}

fn weights<'a>(spec: &LayerSpec, params: &CudaView<'a, f32>) -> Result<Weights<'a>> {
    let [w_ih, w_hh, b_ih, b_hh] = spec.ranges().map(|r| {
        params.try_slice(r.clone()).ok_or_else(|| {
            Error::kernel("CUDA", format!("parameters {r:?} out of {}", params.len()))
        })
    });
    Ok(Weights {
        w_ih: w_ih?,
        w_hh: w_hh?,
        b_ih: b_ih?,
        b_hh: b_hh?,
    })
}

/// Runs the layer forwards on the GPU; see [`super::cpu::forward`] for the algorithm, which
/// this follows step for step.
pub(super) fn forward(
    spec: &LayerSpec,
    steps: &Steps,
    xs: &CudaStorage,
    xl: &Layout,
    ps: &CudaStorage,
    pl: &Layout,
    train: bool,
) -> Result<(CudaStorage, Option<Saved>)> {
    let dev = &xs.device;
    let (h, g, input) = (spec.hidden, spec.gate_width(), spec.input);
    let total = steps.total();
    let kind = spec.kind;
    let x = view(xs, xl, "layer input")?;
    let params = view(ps, pl, "parameters")?;
    if x.len() != total * input {
        return Err(Error::kernel(
            "CUDA",
            format!(
                "layer input has {} values, the batch needs {}",
                x.len(),
                total * input
            ),
        ));
    }
    let w = weights(spec, &params)?;

    let widest = steps.sequences();
    let extra_width = if kind.gates() > 1 { h } else { 0 };
    let kept_rows = if train { total } else { widest };
    let mut pre = zeros(dev, kept_rows * g)?;
    let mut extra = zeros(dev, kept_rows * extra_width)?;
    if train {
        gemm(
            dev,
            (total, g, input),
            &x,
            false,
            &w.w_ih,
            true,
            &mut pre,
            false,
        )?;
    }
    let mut out_h = zeros(dev, total * h)?;
    let mut out_c = zeros(dev, usize::from(kind == ModelKind::Lstm) * total * h)?;
    let mut hg = zeros(dev, widest * g)?;
    let relu = i32::from(kind == ModelKind::RnnRelu);
    let hi_ = int(h, "hidden size")?;
    for t in steps.order(spec.reverse) {
        let (rows, at) = (steps.batch_sizes[t], steps.offsets[t]);
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        let kept_at = if train { at } else { 0 };
        let mut pre_t = pre.slice_mut(kept_at * g..(kept_at + rows) * g);
        if !train {
            let x_t = x.slice(at * input..(at + rows) * input);
            gemm(
                dev,
                (rows, g, input),
                &x_t,
                false,
                &w.w_ih,
                true,
                &mut pre_t,
                false,
            )?;
        }
        if prev_rows > 0 {
            let h_prev = out_h.slice(prev_at * h..(prev_at + prev_rows) * h);
            let mut hg_t = hg.slice_mut(..prev_rows * g);
            gemm(
                dev,
                (prev_rows, g, h),
                &h_prev,
                false,
                &w.w_hh,
                true,
                &mut hg_t,
                false,
            )?;
        }
        let (ri, pi) = (int(rows, "rows")?, int(prev_rows, "rows")?);
        // The current block and the previous one never overlap: split each buffer between them.
        let sp = Split::new(h, (at, rows), prev_at);
        let (mut lo, mut hi) = out_h.split_at_mut(sp.at);
        let (mut h_t, mut h_prev) = sp.pick(&mut lo, &mut hi);
        let mut extra_t = extra.slice_mut(kept_at * extra_width..(kept_at + rows) * extra_width);
        match kind {
            ModelKind::RnnTanh | ModelKind::RnnRelu => launch!(
                dev,
                "rnn_fwd",
                rows * h,
                &mut pre_t,
                &hg,
                &w.b_ih,
                &w.b_hh,
                &mut h_t,
                &ri,
                &pi,
                &hi_,
                &relu,
            )?,
            ModelKind::Lstm => {
                let (mut c_lo, mut c_hi) = out_c.split_at_mut(sp.at);
                let (mut c_t, mut c_prev) = sp.pick(&mut c_lo, &mut c_hi);
                launch!(
                    dev,
                    "lstm_fwd",
                    rows * h,
                    &mut pre_t,
                    &hg,
                    &w.b_ih,
                    &w.b_hh,
                    &mut c_prev,
                    &mut c_t,
                    &mut extra_t,
                    &mut h_t,
                    &ri,
                    &pi,
                    &hi_,
                )?
            }
            ModelKind::Gru => launch!(
                dev,
                "gru_fwd",
                rows * h,
                &mut pre_t,
                &hg,
                &w.b_ih,
                &w.b_hh,
                &mut h_prev,
                &mut extra_t,
                &mut h_t,
                &ri,
                &pi,
                &hi_,
            )?,
        }
    }
    let saved = if train {
        let c = (kind == ModelKind::Lstm).then(|| {
            let s = CudaStorage::wrap_cuda_slice(out_c, dev.clone());
            Tensor::from_storage(Storage::Cuda(s), (total, h), BackpropOp::none(), false)
        });
        Some(Saved {
            gates: pre,
            extra,
            c,
        })
    } else {
        None
    };
    Ok((CudaStorage::wrap_cuda_slice(out_h, dev.clone()), saved))
}

/// Where to split a step-major buffer so that one step's block (`rows` rows at row `at`) and
/// the previous step's block (starting at row `prev_at`) can be borrowed together. Blocks never
/// overlap: the previous one lies wholly before the current one (forward direction) or starts
/// right after it (backward direction).
struct Split {
    at: usize,
    cur_first: bool,
    start: usize,
    len: usize,
    prev_start: usize,
}

impl Split {
    fn new(h: usize, (at, rows): (usize, usize), prev_at: usize) -> Self {
        let (start, len, prev_start) = (at * h, rows * h, prev_at * h);
        let cur_first = prev_start >= start;
        Self {
            at: if cur_first { start + len } else { start },
            cur_first,
            start,
            len,
            prev_start,
        }
    }

    /// The current block and the previous block's start, from the two halves of the split.
    fn pick<'a>(
        &self,
        lo: &'a mut CudaViewMut<'_, f32>,
        hi: &'a mut CudaViewMut<'_, f32>,
    ) -> (CudaViewMut<'a, f32>, CudaViewMut<'a, f32>) {
        if self.cur_first {
            (lo.slice_mut(self.start..), hi.slice_mut(..))
        } else {
            (hi.slice_mut(..self.len), lo.slice_mut(self.prev_start..))
        }
    }
}

/// What the backward pass reads on the device.
pub(super) struct BackwardInputs<'a> {
    pub x: (&'a CudaStorage, &'a Layout),
    pub params: (&'a CudaStorage, &'a Layout),
    pub out: (&'a CudaStorage, &'a Layout),
    pub grad: (&'a CudaStorage, &'a Layout),
    pub saved: &'a Saved,
}

/// The gradients with respect to the layer input (when `want_dx`) and to the whole flat
/// parameter vector; follows [`super::cpu::backward`] step for step.
pub(super) fn backward(
    spec: &LayerSpec,
    steps: &Steps,
    inputs: BackwardInputs<'_>,
    want_dx: bool,
) -> Result<(Option<CudaStorage>, CudaStorage)> {
    let dev = &inputs.x.0.device;
    let (h, g, input) = (spec.hidden, spec.gate_width(), spec.input);
    let total = steps.total();
    let kind = spec.kind;
    let x = view(inputs.x.0, inputs.x.1, "layer input")?;
    let params = view(inputs.params.0, inputs.params.1, "parameters")?;
    let out_h = view(inputs.out.0, inputs.out.1, "layer output")?;
    let grad = view(inputs.grad.0, inputs.grad.1, "output gradient")?;
    let saved = inputs.saved;
    for (what, have, need) in [
        ("layer input", x.len(), total * input),
        ("layer output", out_h.len(), total * h),
        ("output gradient", grad.len(), total * h),
        ("saved gates", saved.gates.len(), total * g),
    ] {
        if have != need {
            return Err(Error::kernel(
                "CUDA",
                format!("{what} has {have} values, needs {need}"),
            ));
        }
    }
    let w = weights(spec, &params)?;
    let c_guard = saved.c.as_ref().map(Tensor::storage_and_layout);
    let out_c = match &c_guard {
        Some((storage, layout)) => match &**storage {
            Storage::Cuda(s) => Some(view(s, layout, "saved cell state")?),
            _ => {
                return Err(Error::kernel(
                    "CUDA",
                    "the saved cell state left the GPU".into(),
                ));
            }
        },
        None => None,
    };

    let mut dg = zeros(dev, total * g)?;
    let mut dg_hidden = zeros(dev, usize::from(kind == ModelKind::Gru) * total * g)?;
    let widest = steps.sequences();
    let mut carry_h = zeros(dev, widest * h)?;
    let mut carry_c = zeros(dev, usize::from(kind == ModelKind::Lstm) * widest * h)?;
    let relu = i32::from(kind == ModelKind::RnnRelu);
    let hi_ = int(h, "hidden size")?;
    for t in steps.order(!spec.reverse) {
        let (rows, at) = (steps.batch_sizes[t], steps.offsets[t]);
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        let (ri, pi) = (int(rows, "rows")?, int(prev_rows, "rows")?);
        let n = rows * h;
        let grad_t = grad.slice(at * h..(at + rows) * h);
        let gates_t = saved.gates.slice(at * g..(at + rows) * g);
        let mut dg_t = dg.slice_mut(at * g..(at + rows) * g);
        match kind {
            ModelKind::RnnTanh | ModelKind::RnnRelu => {
                let out_t = out_h.slice(at * h..(at + rows) * h);
                let ni = int(n, "elements")?;
                launch!(
                    dev, "rnn_bwd", n, &grad_t, &carry_h, &out_t, &mut dg_t, &ni, &relu
                )?;
            }
            ModelKind::Lstm => {
                let c = out_c.as_ref().ok_or_else(|| {
                    Error::kernel("CUDA", "an LSTM backward pass without c".into())
                })?;
                let c_prev = c.slice(prev_at * h..);
                let tanh_c = saved.extra.slice(at * h..(at + rows) * h);
                launch!(
                    dev,
                    "lstm_bwd",
                    n,
                    &grad_t,
                    &carry_h,
                    &mut carry_c,
                    &gates_t,
                    &tanh_c,
                    &c_prev,
                    &mut dg_t,
                    &ri,
                    &pi,
                    &hi_,
                )?;
            }
            ModelKind::Gru => {
                let hn = saved.extra.slice(at * h..(at + rows) * h);
                let h_prev = out_h.slice(prev_at * h..);
                let mut dgh_t = dg_hidden.slice_mut(at * g..(at + rows) * g);
                launch!(
                    dev,
                    "gru_bwd",
                    n,
                    &grad_t,
                    &mut carry_h,
                    &gates_t,
                    &hn,
                    &h_prev,
                    &mut dg_t,
                    &mut dgh_t,
                    &ri,
                    &pi,
                    &hi_,
                )?;
            }
        }
        if prev_rows > 0 {
            let src = if kind == ModelKind::Gru {
                &dg_hidden
            } else {
                &dg
            };
            let src = src.slice(at * g..(at + prev_rows) * g);
            let mut carry = carry_h.slice_mut(..prev_rows * h);
            gemm(
                dev,
                (prev_rows, h, g),
                &src,
                false,
                &w.w_hh,
                false,
                &mut carry,
                kind == ModelKind::Gru,
            )?;
        }
    }

    // Each packed row's previous state (zeros where a sequence starts), for dW_hh.
    let mut h_prev_all = zeros(dev, total * h)?;
    for t in 0..steps.batch_sizes.len() {
        let (prev_rows, prev_at) = steps.prev(t, spec.reverse);
        if prev_rows > 0 {
            let at = steps.offsets[t];
            let src = out_h.slice(prev_at * h..(prev_at + prev_rows) * h);
            let mut dst = h_prev_all.slice_mut(at * h..(at + prev_rows) * h);
            dev.memcpy_dtod(&src, &mut dst)?;
        }
    }
    let dgh = if kind == ModelKind::Gru {
        &dg_hidden
    } else {
        &dg
    };
    let p = spec.params;
    let mut dparams = zeros(dev, spec.param_len)?;
    {
        let mut d = dparams.slice_mut(p.w_ih..p.w_ih + g * input);
        gemm(dev, (g, input, total), &dg, true, &x, false, &mut d, false)?;
    }
    {
        let mut d = dparams.slice_mut(p.w_hh..p.w_hh + g * h);
        gemm(
            dev,
            (g, h, total),
            dgh,
            true,
            &h_prev_all,
            false,
            &mut d,
            false,
        )?;
    }
    column_sums(
        dev,
        &dg.as_view(),
        total,
        g,
        &mut dparams.slice_mut(p.b_ih..p.b_ih + g),
    )?;
    column_sums(
        dev,
        &dgh.as_view(),
        total,
        g,
        &mut dparams.slice_mut(p.b_hh..p.b_hh + g),
    )?;
    let dx = if want_dx {
        let mut dx = zeros(dev, total * input)?;
        gemm(
            dev,
            (total, input, g),
            &dg,
            false,
            &w.w_ih,
            false,
            &mut dx,
            false,
        )?;
        Some(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    } else {
        None
    };
    Ok((dx, CudaStorage::wrap_cuda_slice(dparams, dev.clone())))
}

/// `out[j] = sum_r m[r, j]` over a row-major `rows × cols` matrix, as `onesᵀ · m` in cuBLAS.
fn column_sums(
    dev: &CudaDevice,
    m: &CudaView<'_, f32>,
    rows: usize,
    cols: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let mut ones = zeros(dev, rows)?;
    let ri = int(rows, "rows")?;
    launch!(dev, "fill", rows, &mut ones, &1.0f32, &ri)?;
    gemm(dev, (1, cols, rows), &ones, false, m, false, out, false)
}

/// The head's forward pass: `y = x Wᵀ + b`.
pub(super) fn head_forward(
    spec: &HeadSpec,
    b_sz: usize,
    xs: &CudaStorage,
    xl: &Layout,
    ps: &CudaStorage,
    pl: &Layout,
) -> Result<CudaStorage> {
    let dev = &xs.device;
    let x = view(xs, xl, "head input")?;
    let p = view(ps, pl, "parameters")?;
    let (input, output) = (spec.input, spec.output);
    let w = p.slice(spec.weight..spec.weight + input * output);
    let b = p.slice(spec.bias..spec.bias + output);
    let mut y = zeros(dev, b_sz * output)?;
    let (ri, ci) = (int(b_sz, "rows")?, int(output, "outputs")?);
    launch!(dev, "fill_rows", b_sz * output, &mut y, &b, &ri, &ci)?;
    gemm(
        dev,
        (b_sz, output, input),
        &x,
        false,
        &w,
        true,
        &mut y,
        true,
    )?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The head's backward pass: `dx = dy W`, `dW = dyᵀ x`, `db = Σ dy`.
pub(super) fn head_backward(
    spec: &HeadSpec,
    b_sz: usize,
    (xs, xl): (&CudaStorage, &Layout),
    (ps, pl): (&CudaStorage, &Layout),
    (gs, gl): (&CudaStorage, &Layout),
    want_dx: bool,
) -> Result<(Option<CudaStorage>, CudaStorage)> {
    let dev = &xs.device;
    let x = view(xs, xl, "head input")?;
    let p = view(ps, pl, "parameters")?;
    let dy = view(gs, gl, "head gradient")?;
    let (input, output) = (spec.input, spec.output);
    let mut dp = zeros(dev, spec.param_len)?;
    {
        let mut dw = dp.slice_mut(spec.weight..spec.weight + output * input);
        gemm(
            dev,
            (output, input, b_sz),
            &dy,
            true,
            &x,
            false,
            &mut dw,
            false,
        )?;
    }
    column_sums(
        dev,
        &dy,
        b_sz,
        output,
        &mut dp.slice_mut(spec.bias..spec.bias + output),
    )?;
    let dx = if want_dx {
        let w = p.slice(spec.weight..spec.weight + output * input);
        let mut dx = zeros(dev, b_sz * input)?;
        gemm(
            dev,
            (b_sz, input, output),
            &dy,
            false,
            &w,
            false,
            &mut dx,
            false,
        )?;
        Some(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    } else {
        None
    };
    Ok((dx, CudaStorage::wrap_cuda_slice(dp, dev.clone())))
}

/// The values a contiguous layout addresses, copied to the host.
pub(super) fn to_host(s: &CudaStorage, l: &Layout) -> Result<Vec<f32>> {
    let v = view(s, l, "tensor")?;
    Ok(s.device.clone_dtoh(&v)?)
}

/// Host values as a new buffer on `like`'s device.
pub(super) fn from_host(like: &CudaStorage, values: &[f32]) -> Result<CudaStorage> {
    let s = like.device.clone_htod(values)?;
    Ok(CudaStorage::wrap_cuda_slice(s, like.device.clone()))
}
