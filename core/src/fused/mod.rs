//! Fused recurrent layers: one candle op per layer and direction.
//!
//! [`layer`] runs a whole layer-direction over a packed batch as one node of candle's graph.
//! Inside, the input projection of every time step is one matrix product
//! (`X · W_ihᵀ`, all packed rows at once); then, step by step, one product `h · W_hhᵀ` on the
//! rows that carry a state from the previous step and one fused gate kernel that adds the biases,
//! applies the activations and writes h (and c), keeping what the backward pass needs. The
//! backward pass is written by hand: a reverse loop of the fused gate-gradient kernel and one
//! product `dG · W_hh` per step, then the weight gradients as single products over all steps.
//!
//! The op takes `(x, params)`: `x` is the layer's packed input `(total, input)` and `params` the
//! model's whole flat parameter vector, of which the op reads its four tensors (see
//! [`LayerParams`]). Its output is the hidden state at every packed row, `(total, hidden)`; an
//! LSTM's cell state comes beside it as a tensor outside the graph. Its gradient with respect
//! to `params` is a full-length vector that is zero outside the layer's four tensors.
//!
//! The math is PyTorch's, gate order and all; [`crate::model::reference`] is the per-step
//! implementation it is tested against.

pub mod act;
mod blas;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod head;
mod workspace;

pub use head::{HeadSpec, head, squared_error};

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use crate::model::ModelKind;
use crate::{Error, Result};

/// Where one layer-direction's tensors start in the flat parameter vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParams {
    /// `weight_ih`: `(gates * hidden, input)`, row-major.
    pub w_ih: usize,
    /// `weight_hh`: `(gates * hidden, hidden)`, row-major.
    pub w_hh: usize,
    /// `bias_ih`: `gates * hidden`.
    pub b_ih: usize,
    /// `bias_hh`: `gates * hidden`.
    pub b_hh: usize,
}

/// One layer-direction: its cell, sizes, direction and parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    /// The cell.
    pub kind: ModelKind,
    /// Features of the layer's input per step.
    pub input: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Runs from each sequence's last step to its first.
    pub reverse: bool,
    /// Offsets of the layer's tensors in the flat parameter vector.
    pub params: LayerParams,
    /// Length of the whole flat parameter vector.
    pub param_len: usize,
}

impl LayerSpec {
    /// Gate pre-activations per row: `gates * hidden`.
    pub fn gate_width(&self) -> usize {
        self.kind.gates() * self.hidden
    }

    /// Where `weight_ih`, `weight_hh`, `bias_ih` and `bias_hh` lie in the flat parameters
    /// (after [`LayerSpec::validate`], inside them).
    fn ranges(&self) -> [std::ops::Range<usize>; 4] {
        let g = self.gate_width();
        let p = self.params;
        [
            p.w_ih..p.w_ih + g * self.input,
            p.w_hh..p.w_hh + g * self.hidden,
            p.b_ih..p.b_ih + g,
            p.b_hh..p.b_hh + g,
        ]
    }

    fn validate(&self) -> Result<()> {
        if self.input == 0 || self.hidden == 0 {
            return Err(Error::kernel(
                "fused layer",
                format!(
                    "a layer needs input and hidden sizes of at least 1, got {} and {}",
                    self.input, self.hidden
                ),
            ));
        }
        let too_large = || Error::kernel("fused layer", format!("sizes {self:?} overflow"));
        let g = self
            .kind
            .gates()
            .checked_mul(self.hidden)
            .ok_or_else(too_large)?;
        let p = self.params;
        for (name, start, len) in [
            (
                "weight_ih",
                p.w_ih,
                g.checked_mul(self.input).ok_or_else(too_large)?,
            ),
            (
                "weight_hh",
                p.w_hh,
                g.checked_mul(self.hidden).ok_or_else(too_large)?,
            ),
            ("bias_ih", p.b_ih, g),
            ("bias_hh", p.b_hh, g),
        ] {
            if start
                .checked_add(len)
                .is_none_or(|end| end > self.param_len)
            {
                return Err(Error::kernel(
                    "fused layer",
                    format!(
                        "{name} at {start}..{} lies outside the {} parameters",
                        start.saturating_add(len),
                        self.param_len
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The time structure of a packed batch: `batch_sizes[t]` sequences run at step `t`, and their
/// rows are `offsets[t] .. offsets[t] + batch_sizes[t]` (longest sequence first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steps {
    batch_sizes: Vec<usize>,
    offsets: Vec<usize>,
    total: usize,
}

impl Steps {
    /// Checks that the sizes are those of a packed batch: at least one step, none empty, none
    /// larger than the one before.
    pub fn new(batch_sizes: Vec<usize>) -> Result<Self> {
        if batch_sizes.first().is_none_or(|&b| b == 0) {
            return Err(Error::kernel(
                "fused layer",
                "a packed batch needs at least one row".into(),
            ));
        }
        if let Some(t) = batch_sizes
            .windows(2)
            .position(|w| w[1] > w[0] || w[1] == 0)
        {
            return Err(Error::kernel(
                "fused layer",
                format!(
                    "batch sizes must not grow or reach zero, but step {} has {} rows after {}",
                    t + 1,
                    batch_sizes[t + 1],
                    batch_sizes[t]
                ),
            ));
        }
        let mut offsets = Vec::with_capacity(batch_sizes.len());
        let mut total = 0;
        for &b in &batch_sizes {
            offsets.push(total);
            total += b;
        }
        Ok(Self {
            batch_sizes,
            offsets,
            total,
        })
    }

    /// Rows running at each step.
    pub fn batch_sizes(&self) -> &[usize] {
        &self.batch_sizes
    }

    /// First packed row of each step.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// Packed rows in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Sequences in the batch (the rows of the first step).
    pub fn sequences(&self) -> usize {
        self.batch_sizes[0]
    }

    /// Steps in the order a direction visits them.
    fn order(&self, reverse: bool) -> impl Iterator<Item = usize> + use<> {
        let n = self.batch_sizes.len();
        (0..n).map(move |i| if reverse { n - 1 - i } else { i })
    }

    /// The step whose state feeds step `t`, as `(rows, first row)`: the first `rows` rows of
    /// step `t` have a previous state, the others start from zeros. `(0, 0)` for none.
    fn prev(&self, t: usize, reverse: bool) -> (usize, usize) {
        let n = self.batch_sizes.len();
        if reverse {
            if t + 1 < n {
                (self.batch_sizes[t + 1], self.offsets[t + 1])
            } else {
                (0, 0)
            }
        } else if t > 0 {
            (self.batch_sizes[t], self.offsets[t - 1])
        } else {
            (0, 0)
        }
    }
}

/// What the forward pass keeps for the backward pass, beside its output.
#[derive(Debug)]
enum Saved {
    Cpu(cpu::Saved),
    #[cfg(feature = "cuda")]
    Cuda(cuda::Saved),
}

impl Saved {
    fn cell_state(&self) -> Option<&Tensor> {
        match self {
            Saved::Cpu(s) => s.c.as_ref(),
            #[cfg(feature = "cuda")]
            Saved::Cuda(s) => s.c.as_ref(),
        }
    }
}

/// Where the op leaves its saved activations, shared with [`layer`] so it can hand out the
/// LSTM's cell state.
type SavedSlot = Arc<Mutex<Option<Arc<Saved>>>>;

/// The layer as a candle op; see the module docs.
struct LayerOp {
    spec: LayerSpec,
    steps: Arc<Steps>,
    /// Keep activations for a backward pass.
    train: bool,
    saved: SavedSlot,
}

/// What [`layer`] returns.
#[derive(Debug)]
pub struct LayerOutput {
    /// The hidden state at every packed row, `(total, hidden)`, in candle's graph when trained.
    pub h: Tensor,
    /// An LSTM's cell state at every packed row, `(total, hidden)`, when run with `train`. It
    /// is outside candle's graph: a loss on it has no gradient.
    pub c: Option<Tensor>,
}

/// Runs one layer-direction over the packed input `x` (`(total, input)`) with the parameters in
/// `params` (the whole flat vector). With `train`, the op joins candle's graph and keeps what
/// its backward pass needs; without, it keeps nothing and tracks nothing (inference).
pub fn layer(
    x: &Tensor,
    params: &Tensor,
    spec: &LayerSpec,
    steps: &Arc<Steps>,
    train: bool,
) -> Result<LayerOutput> {
    spec.validate()?;
    if x.dims() != [steps.total(), spec.input] {
        return Err(Error::kernel(
            "fused layer",
            format!(
                "layer input has shape {:?}, the batch needs ({}, {})",
                x.dims(),
                steps.total(),
                spec.input
            ),
        ));
    }
    if params.dims() != [spec.param_len] {
        return Err(Error::kernel(
            "fused layer",
            format!(
                "parameters have shape {:?}, expected ({},)",
                params.dims(),
                spec.param_len
            ),
        ));
    }
    if !x.device().same_device(params.device()) {
        return Err(Error::kernel(
            "fused layer",
            "layer input and parameters are on different devices".into(),
        ));
    }
    let saved = SavedSlot::default();
    let op = LayerOp {
        spec: *spec,
        steps: steps.clone(),
        train,
        saved: saved.clone(),
    };
    let x = x.contiguous()?;
    let h = if train {
        x.apply_op2_arc(params, Arc::new(Box::new(op)))?
    } else {
        x.apply_op2_no_bwd(params, &op)?
    };
    let c = saved
        .lock()
        .map_err(|_| Error::kernel("fused layer", "poisoned state".into()))?
        .as_ref()
        .and_then(|s| s.cell_state().cloned());
    Ok(LayerOutput { h, c })
}

/// Compiles the CUDA gate kernels with nvrtc (once per process), without touching a GPU: what
/// a worker does before its first CUDA step, callable on its own to check a host's toolkit.
#[cfg(feature = "cuda")]
pub fn compile_cuda_kernels() -> Result<()> {
    cuda::ptx().map(|_| ())
}

/// Free and total memory of a GPU, in bytes; `None` for the CPU, or when the driver cannot say.
pub fn device_memory(device: &candle_core::Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// Threads for the matrix products: the process's compute pool, sized from `CANDLE_NUM_THREADS`
/// (or the cores) when first read and fixed from then on.
pub fn compute_threads() -> usize {
    threads()
}

fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// The contiguous f32 values a layout addresses.
fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => Err(candle_core::Error::Msg(format!(
            "recurrent kernel: {what} is not contiguous"
        ))),
    }
}

/// A backward pass's results as tensors outside the graph: the gradient of the op's first
/// input (when it was asked for), shaped `dx_shape`, and of the whole flat parameter vector.
fn gradient_tensors(
    dx: Option<Storage>,
    dx_shape: (usize, usize),
    dparams: Storage,
    param_len: usize,
) -> (Option<Tensor>, Option<Tensor>) {
    let dx = dx.map(|s| Tensor::from_storage(s, dx_shape, BackpropOp::none(), false));
    let dparams = Tensor::from_storage(dparams, param_len, BackpropOp::none(), false);
    (dx, Some(dparams))
}

/// The error of a backward pass handed tensors on different devices.
fn mixed_devices(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: backward pass with tensors on different devices"
    ))
}

fn kernel_err(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl LayerOp {
    fn out_shape(&self) -> Shape {
        Shape::from((self.steps.total(), self.spec.hidden))
    }

    fn keep(&self, saved: Saved) -> candle_core::Result<()> {
        let mut slot = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("recurrent kernel: poisoned state".into()))?;
        *slot = Some(Arc::new(saved));
        Ok(())
    }
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "recur-fused-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "layer input")?;
        let params = contiguous(s2, l2, "parameters")?;
        let (out, saved) = cpu::forward(&self.spec, &self.steps, x, params, self.train, threads())
            .map_err(kernel_err)?;
        if let Some(saved) = saved {
            self.keep(Saved::Cpu(saved))?;
        }
        Ok((CpuStorage::F32(out), self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (out, saved) = cuda::forward(&self.spec, &self.steps, s1, l1, s2, l2, self.train)
            .map_err(kernel_err)?;
        if let Some(saved) = saved {
            self.keep(Saved::Cuda(saved))?;
        }
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("recurrent kernel: poisoned state".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "recurrent kernel: backward pass of a layer run without `train`".into(),
                )
            })?;
        let want_dx = x.track_op();
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (dx, dparams): (Option<Storage>, Storage) = match (&*xs, &*ps, &*rs, &*gs, &*saved) {
            (
                Storage::Cpu(xs),
                Storage::Cpu(ps),
                Storage::Cpu(rs),
                Storage::Cpu(gs),
                Saved::Cpu(sv),
            ) => {
                let (dx, dp) = cpu::backward(
                    &self.spec,
                    &self.steps,
                    cpu::BackwardInputs {
                        x: contiguous(xs, xl, "layer input")?,
                        params: contiguous(ps, pl, "parameters")?,
                        out: contiguous(rs, rl, "layer output")?,
                        grad: contiguous(gs, gl, "output gradient")?,
                        saved: sv,
                    },
                    want_dx,
                    threads(),
                )
                .map_err(kernel_err)?;
                (
                    dx.map(|v| Storage::Cpu(CpuStorage::F32(v))),
                    Storage::Cpu(CpuStorage::F32(dp)),
                )
            }
            #[cfg(feature = "cuda")]
            (
                Storage::Cuda(xs),
                Storage::Cuda(ps),
                Storage::Cuda(rs),
                Storage::Cuda(gs),
                Saved::Cuda(sv),
            ) => {
                let (dx, dp) = cuda::backward(
                    &self.spec,
                    &self.steps,
                    cuda::BackwardInputs {
                        x: (xs, xl),
                        params: (ps, pl),
                        out: (rs, rl),
                        grad: (gs, gl),
                        saved: sv,
                    },
                    want_dx,
                )
                .map_err(kernel_err)?;
                (dx.map(Storage::Cuda), Storage::Cuda(dp))
            }
            _ => return Err(mixed_devices("fused layer")),
        };
        Ok(gradient_tensors(
            dx,
            (self.steps.total(), self.spec.input),
            dparams,
            self.spec.param_len,
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn spec(param_len: usize) -> LayerSpec {
        LayerSpec {
            kind: ModelKind::Gru,
            input: 2,
            hidden: 3,
            reverse: false,
            params: LayerParams {
                w_ih: 0,
                w_hh: 18,
                b_ih: 45,
                b_hh: 54,
            },
            param_len,
        }
    }

    fn err(r: Result<LayerOutput>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn batch_sizes_must_be_those_of_a_packed_batch() {
        assert!(Steps::new(vec![]).is_err());
        assert!(Steps::new(vec![0]).is_err());
        let e = Steps::new(vec![2, 3]).unwrap_err().to_string();
        assert!(e.contains("step 1 has 3 rows after 2"), "{e}");
        assert!(Steps::new(vec![2, 0]).is_err());
        let s = Steps::new(vec![3, 2, 2]).unwrap();
        assert_eq!((s.offsets(), s.total()), (&[0, 3, 5][..], 7));
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors_not_panics() {
        let steps = Arc::new(Steps::new(vec![2, 1]).unwrap());
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 2), candle_core::DType::F32, &dev).unwrap();
        let p = Tensor::zeros(63, candle_core::DType::F32, &dev).unwrap();
        assert!(layer(&x, &p, &spec(63), &steps, true).is_ok());

        let wrong_x = Tensor::zeros((4, 2), candle_core::DType::F32, &dev).unwrap();
        let e = err(layer(&wrong_x, &p, &spec(63), &steps, true));
        assert!(e.contains("layer input has shape [4, 2]"), "{e}");
        let e = err(layer(&x, &p, &spec(64), &steps, true));
        assert!(e.contains("parameters have shape [63]"), "{e}");
        let mut outside = spec(63);
        outside.params.b_hh = 60;
        let e = err(layer(&x, &p, &outside, &steps, false));
        assert!(e.contains("bias_hh at 60..69"), "{e}");
        let mut empty = spec(63);
        empty.hidden = 0;
        assert!(err(layer(&x, &p, &empty, &steps, true)).contains("at least 1"));
        let mut huge = spec(63);
        huge.hidden = usize::MAX / 2;
        assert!(err(layer(&x, &p, &huge, &steps, true)).contains("overflow"));
    }

    #[test]
    fn the_head_and_the_loss_refuse_what_does_not_fit() {
        let dev = Device::Cpu;
        let p = Tensor::zeros(10, candle_core::DType::F32, &dev).unwrap();
        let x = Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap();
        let spec = HeadSpec {
            input: 3,
            output: 2,
            weight: 0,
            bias: 6,
            param_len: 10,
        };
        assert_eq!(head(&x, &p, &spec, true).unwrap().dims(), [4, 2]);
        let wide = Tensor::zeros((4, 5), candle_core::DType::F32, &dev).unwrap();
        let e = head(&wide, &p, &spec, true).unwrap_err().to_string();
        assert!(e.starts_with("head: head input [4, 5]"), "{e}");
        let outside = HeadSpec { bias: 9, ..spec };
        let e = head(&x, &p, &outside, false).unwrap_err().to_string();
        assert!(e.contains("outside the 10 parameters"), "{e}");
        let overflow = HeadSpec {
            input: usize::MAX,
            ..spec
        };
        assert!(head(&x, &p, &overflow, false).is_err());
        let ys = Tensor::zeros((4, 2), candle_core::DType::F32, &dev).unwrap();
        let t = Tensor::zeros((4, 1), candle_core::DType::F32, &dev).unwrap();
        let e = squared_error(&ys, &t).unwrap_err().to_string();
        assert!(e.contains("differ in shape"), "{e}");
    }
}
