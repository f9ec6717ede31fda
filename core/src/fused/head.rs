//! The linear head and the summed squared error as one candle op each, so a training step's
//! graph is the layers, the head and the loss: a handful of nodes whatever the model.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use super::blas::{Mat, MatMut, gemm};
use super::{contiguous, gradient_tensors, kernel_err, mixed_devices, threads};
use crate::{Error, Result};

/// The head `y = x Wᵀ + b` of a model whose flat parameters hold `W` `(output, input)` at
/// `weight` and `b` `(output,)` at `bias`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSpec {
    /// Features in.
    pub input: usize,
    /// Values out.
    pub output: usize,
    /// Offset of this layer's weight (`linear.weight`, `head.{3i}.weight`) in the flat
    /// parameters.
    pub weight: usize,
    /// Offset of this layer's bias in the flat parameters.
    pub bias: usize,
    /// Length of the whole flat parameter vector.
    pub param_len: usize,
}

impl HeadSpec {
    fn validate(&self) -> Result<()> {
        let fits = |start: usize, len: Option<usize>| {
            len.and_then(|len| start.checked_add(len))
                .is_some_and(|e| e <= self.param_len)
        };
        if self.input == 0 || self.output == 0 {
            return Err(Error::kernel(
                "head",
                "a head needs at least one input and one output".into(),
            ));
        }
        if !fits(self.weight, self.input.checked_mul(self.output))
            || !fits(self.bias, Some(self.output))
        {
            return Err(Error::kernel(
                "head",
                format!(
                    "the head's parameters lie outside the {} parameters",
                    self.param_len
                ),
            ));
        }
        Ok(())
    }
}

/// `y = x Wᵀ + b` for `x` `(b_sz, input)`, reading `W` and `b` from the flat `params`; joins
/// candle's graph when `train`.
pub fn head(x: &Tensor, params: &Tensor, spec: &HeadSpec, train: bool) -> Result<Tensor> {
    spec.validate()?;
    let (b_sz, input) = x.dims2()?;
    if input != spec.input || params.dims() != [spec.param_len] {
        return Err(Error::kernel(
            "head",
            format!(
                "head input {:?} and parameters {:?} do not fit a {}→{} head over {} parameters",
                x.dims(),
                params.dims(),
                spec.input,
                spec.output,
                spec.param_len
            ),
        ));
    }
    let op = HeadOp { spec: *spec, b_sz };
    let x = x.contiguous()?;
    Ok(if train {
        x.apply_op2(params, op)?
    } else {
        x.apply_op2_no_bwd(params, &op)?
    })
}

struct HeadOp {
    spec: HeadSpec,
    b_sz: usize,
}

impl CustomOp2 for HeadOp {
    fn name(&self) -> &'static str {
        "recur-head"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, "head input")?;
        let p = contiguous(s2, l2, "parameters")?;
        let HeadSpec {
            input,
            output,
            weight,
            bias,
            ..
        } = self.spec;
        let w = &p[weight..weight + input * output];
        let b = &p[bias..bias + output];
        let mut y: Vec<f32> = b.iter().copied().cycle().take(self.b_sz * output).collect();
        gemm(
            MatMut::rows(&mut y, self.b_sz, output),
            true,
            Mat::rows(x, self.b_sz, input),
            Mat::transposed(w, input, output),
            threads(),
        )
        .map_err(kernel_err)?;
        Ok((CpuStorage::F32(y), Shape::from((self.b_sz, output))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let y =
            super::cuda::head_forward(&self.spec, self.b_sz, s1, l1, s2, l2).map_err(kernel_err)?;
        Ok((y, Shape::from((self.b_sz, self.spec.output))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let want_dx = x.track_op();
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (dx, dp): (Option<Storage>, Storage) = match (&*xs, &*ps, &*gs) {
            (Storage::Cpu(xs), Storage::Cpu(ps), Storage::Cpu(gs)) => {
                let (dx, dp) = self
                    .cpu_bwd(
                        contiguous(xs, xl, "head input")?,
                        contiguous(ps, pl, "parameters")?,
                        contiguous(gs, gl, "head gradient")?,
                        want_dx,
                    )
                    .map_err(kernel_err)?;
                (
                    dx.map(|v| Storage::Cpu(CpuStorage::F32(v))),
                    Storage::Cpu(CpuStorage::F32(dp)),
                )
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(xs), Storage::Cuda(ps), Storage::Cuda(gs)) => {
                let (dx, dp) = super::cuda::head_backward(
                    &self.spec,
                    self.b_sz,
                    (xs, xl),
                    (ps, pl),
                    (gs, gl),
                    want_dx,
                )
                .map_err(kernel_err)?;
                (dx.map(Storage::Cuda), Storage::Cuda(dp))
            }
            _ => return Err(mixed_devices("head")),
        };
        Ok(gradient_tensors(
            dx,
            (self.b_sz, self.spec.input),
            dp,
            self.spec.param_len,
        ))
    }
}

impl HeadOp {
    /// `dx = dy W`, `dW = dyᵀ x`, `db = Σ dy`.
    fn cpu_bwd(
        &self,
        x: &[f32],
        p: &[f32],
        dy: &[f32],
        want_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let HeadSpec {
            input,
            output,
            weight,
            bias,
            param_len,
        } = self.spec;
        let b_sz = self.b_sz;
        let mut dp = vec![0.0f32; param_len];
        gemm(
            MatMut::rows(&mut dp[weight..weight + output * input], output, input),
            false,
            Mat::transposed(dy, output, b_sz),
            Mat::rows(x, b_sz, input),
            threads(),
        )?;
        let db = &mut dp[bias..bias + output];
        for row in dy.chunks_exact(output) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        let dx = if want_dx {
            let mut dx = vec![0.0f32; b_sz * input];
            gemm(
                MatMut::rows(&mut dx, b_sz, input),
                false,
                Mat::rows(dy, b_sz, output),
                Mat::rows(&p[weight..weight + output * input], output, input),
                threads(),
            )?;
            Some(dx)
        } else {
            None
        };
        Ok((dx, dp))
    }
}

/// `sum_ij (y_ij - t_ij)^2 / output`: the summed (over the batch) mean squared error of each
/// sample, as a scalar joined to candle's graph through `ys`. `targets` gets no gradient.
pub fn squared_error(ys: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if ys.dims() != targets.dims() || ys.rank() != 2 {
        return Err(Error::kernel(
            "squared error",
            format!(
                "predictions {:?} and targets {:?} differ in shape",
                ys.dims(),
                targets.dims()
            ),
        ));
    }
    Ok(ys
        .contiguous()?
        .apply_op2(&targets.contiguous()?, SquaredError)?)
}

struct SquaredError;

impl SquaredError {
    fn sum(y: &[f32], t: &[f32], output: usize) -> f32 {
        let s: f64 = y
            .iter()
            .zip(t)
            .map(|(a, b)| {
                let d = (a - b) as f64;
                d * d
            })
            .sum();
        (s / output as f64) as f32
    }

    /// `d/dy = 2 (y - t) / output * g`.
    fn grad(y: &[f32], t: &[f32], output: usize, g: f32) -> Vec<f32> {
        let k = 2.0 * g / output as f32;
        y.iter().zip(t).map(|(a, b)| k * (a - b)).collect()
    }
}

impl CustomOp2 for SquaredError {
    fn name(&self) -> &'static str {
        "recur-squared-error"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = l1.dims().get(1).copied().unwrap_or(1);
        let y = contiguous(s1, l1, "predictions")?;
        let t = contiguous(s2, l2, "targets")?;
        Ok((
            CpuStorage::F32(vec![Self::sum(y, t, output)]),
            Shape::from(()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let output = l1.dims().get(1).copied().unwrap_or(1);
        // A batch's predictions are a few hundred values: the sum runs on the host.
        let (y, t) = (
            super::cuda::to_host(s1, l1).map_err(kernel_err)?,
            super::cuda::to_host(s2, l2).map_err(kernel_err)?,
        );
        let s = super::cuda::from_host(s1, &[Self::sum(&y, &t, output)]).map_err(kernel_err)?;
        Ok((s, Shape::from(())))
    }

    fn bwd(
        &self,
        ys: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let output = ys.dims().get(1).copied().unwrap_or(1);
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let y = ys.flatten_all()?.to_vec1::<f32>()?;
        let t = targets.flatten_all()?.to_vec1::<f32>()?;
        let dy = Tensor::from_vec(Self::grad(&y, &t, output, g), ys.shape(), ys.device())?;
        Ok((Some(dy), None))
    }
}
