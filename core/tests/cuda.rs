//! The fused ops on an NVIDIA GPU against the same ops on the CPU (themselves tested against
//! the per-step reference and PyTorch). Built only with `--features cuda`; run on a GPU host:
//!
//! ```text
//! cargo test --release -p recur-core --features cuda --test cuda
//! ```
//!
//! Without a usable GPU every test but the nvrtc one fails, saying so: these tests never pass
//! by skipping. CI has no GPU; it compiles them (and the kernels, with nvcc) only.
//!
//! Tolerance: `1e-4` relative plus `1e-4` of the tensor's largest magnitude, ten times the
//! CPU-vs-reference bound: the GPU's `expf`/`tanhf` and cuBLAS's summation order differ from
//! the CPU's, and those differences compound over up to 60 steps.

#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recur_core::data::{BallConfig, epoch_batches};
use recur_core::fused::{compile_cuda_kernels, squared_error};
use recur_core::model::{ModelConfig, ModelKind, PackedBatch, Params, SeqModel};
use recur_core::step::{Batch, grad_sum, predict};

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| {
        panic!("these tests need an NVIDIA GPU (cuda:0) and a driver; none could be opened: {e}")
    })
}

fn close(what: &str, gpu: &Tensor, cpu: &Tensor) {
    assert_eq!(gpu.dims(), cpu.dims(), "{what}: shape");
    let g = gpu.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let c = cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (k, (a, b)) in g.iter().zip(&c).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs() + 1e-4 * scale,
            "{what}[{k}]: GPU {a}, CPU {b} (scale {scale})"
        );
    }
}

#[test]
fn gate_kernels_compile_with_nvrtc() {
    compile_cuda_kernels().unwrap();
}

/// Every kind, one and two layers, both directions, a small and a W2-sized hidden layer, on a
/// batch mixing long and short rows: outputs, final states, predictions and every gradient.
#[test]
fn fused_layers_on_the_gpu_match_the_cpu() {
    let dev = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let lengths: Vec<usize> = (0..97)
        .map(|i| if i % 7 == 0 { 50 } else { 1 + i % 13 })
        .collect();
    for kind in ModelKind::ALL {
        for (num_layers, bidirectional, hidden_size) in
            [(1, false, 8), (2, true, 24), (1, false, 128)]
        {
            let config = ModelConfig {
                kind,
                input_size: 2,
                hidden_size,
                num_layers,
                bidirectional,
                output_size: 1,
                head: Default::default(),
            };
            let name = format!("{kind} l{num_layers} bi={bidirectional} h{hidden_size}");
            let seqs: Vec<Vec<f32>> = lengths
                .iter()
                .map(|&l| (0..2 * l).map(|_| rng.random_range(-1.0f32..1.0)).collect())
                .collect();
            let refs: Vec<&[f32]> = seqs.iter().map(Vec::as_slice).collect();
            let flat = Params::init(config, 3, &Device::Cpu)
                .unwrap()
                .to_flat()
                .unwrap();
            let run = |device: &Device| {
                let model = SeqModel::new(Params::from_flat(config, &flat, device).unwrap());
                let batch = PackedBatch::new(&refs, 2, device).unwrap();
                let out = model.forward(&batch, true).unwrap();
                let targets = Tensor::ones(out.ys.shape(), out.ys.dtype(), device).unwrap();
                let grads = squared_error(&out.ys, &targets)
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads = model.params().grads_flat(&grads).unwrap();
                let n = grads.len();
                let inferred = model
                    .infer(&batch)
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap();
                let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
                (
                    cpu(&out.ys),
                    out.h_n.iter().map(cpu).collect::<Vec<_>>(),
                    out.c_n.iter().map(cpu).collect::<Vec<_>>(),
                    out.outputs.iter().map(cpu).collect::<Vec<_>>(),
                    Tensor::from_vec(grads, n, &Device::Cpu).unwrap(),
                    inferred,
                )
            };
            let (ys, h_n, c_n, outputs, grads, inferred) = run(&dev);
            let (ys_c, h_n_c, c_n_c, outputs_c, grads_c, inferred_c) = run(&Device::Cpu);
            close(&format!("{name} y"), &ys, &ys_c);
            close(&format!("{name} inference"), &inferred, &inferred_c);
            for (k, (a, b)) in h_n.iter().zip(&h_n_c).enumerate() {
                close(&format!("{name} h_n[{k}]"), a, b);
            }
            assert_eq!(c_n.len(), c_n_c.len());
            for (k, (a, b)) in c_n.iter().zip(&c_n_c).enumerate() {
                close(&format!("{name} c_n[{k}]"), a, b);
            }
            for (t, (a, b)) in outputs.iter().zip(&outputs_c).enumerate() {
                close(&format!("{name} output {t}"), a, b);
            }
            close(&format!("{name} gradients"), &grads, &grads_c);
            let g = grads.to_vec1::<f32>().unwrap();
            assert!(
                g.iter().any(|v| *v != 0.0),
                "{name}: no gradient reached the parameters"
            );
        }
    }
}

/// A worker's step on the GPU: the same summed gradient and metric sums as on the CPU, and
/// predictions through the forward-only path.
#[test]
fn a_training_step_on_the_gpu_matches_the_cpu() {
    let dev = gpu();
    let data = BallConfig::w2(1).generate().unwrap().scaled(50.0);
    let rows: Vec<usize> = (0..data.len()).collect();
    let batch_rows = &epoch_batches(&rows, 256, 1, 0)[0];
    for kind in [ModelKind::Lstm, ModelKind::Gru, ModelKind::RnnTanh] {
        let config = ModelConfig {
            kind,
            hidden_size: 128,
            ..ModelConfig::tutorial()
        };
        let flat = Params::init(config, 9, &Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
        let step = |device: &Device| {
            let model = SeqModel::new(Params::from_flat(config, &flat, device).unwrap());
            let batch = Batch::from_rows(&data, batch_rows, device).unwrap();
            (
                grad_sum(
                    &model,
                    &batch,
                    &[recur_core::data::Affine::divide(50.0)],
                    recur_core::step::Loss::Mse,
                    None,
                )
                .unwrap(),
                predict(&model, &batch).unwrap(),
            )
        };
        let (g, p) = step(&dev);
        let (g_c, p_c) = step(&Device::Cpu);
        let t = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        close(&format!("{kind} gradient"), &t(g.grads), &t(g_c.grads));
        close(&format!("{kind} predictions"), &t(p), &t(p_c));
        assert_eq!(g.sums.samples, g_c.sums.samples);
        assert!(
            (g.sums.squared_error - g_c.sums.squared_error).abs() <= 1e-3 * g_c.sums.squared_error
        );
    }
}

/// An MLP head with dropout, trained on a target at every step (the every-step gather, the
/// ReLU and mask products and the head's backward over every row) on the GPU: the same
/// gradient, metric sums and per-step predictions as on the CPU.
#[test]
fn an_mlp_head_at_every_step_with_dropout_on_the_gpu_matches_the_cpu() {
    let dev = gpu();
    let (steps, rows) = (12, 300);
    let mut data = recur_core::data::Dataset::every_step(2, steps, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..rows {
        let row: Vec<f32> = (0..steps * 4)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        data.push_row(&row);
    }
    let config = ModelConfig {
        kind: ModelKind::Gru,
        input_size: 2,
        hidden_size: 64,
        num_layers: 2,
        bidirectional: false,
        output_size: 2,
        head: recur_core::model::HeadLayers::new(&[32, 16]).unwrap(),
    };
    let flat = Params::init(config, 3, &Device::Cpu)
        .unwrap()
        .to_flat()
        .unwrap();
    let batch_rows: Vec<usize> = (0..rows).collect();
    let keys: Vec<u64> = batch_rows.iter().map(|&r| r as u64).collect();
    let step = |device: &Device| {
        let model = SeqModel::new(Params::from_flat(config, &flat, device).unwrap());
        let batch = Batch::from_rows(&data, &batch_rows, device).unwrap();
        let dropout = recur_core::step::StepDropout {
            dropout: recur_core::model::Dropout { p: 0.3, seed: 5 },
            step: 2,
            rows: &keys,
        };
        (
            grad_sum(
                &model,
                &batch,
                &[recur_core::data::Affine::divide(1.0); 2],
                recur_core::step::Loss::Mse,
                Some(dropout),
            )
            .unwrap(),
            recur_core::step::predict_targets(&model, &batch).unwrap(),
        )
    };
    let (g, p) = step(&dev);
    let (g_c, p_c) = step(&Device::Cpu);
    let t = |v: Vec<f32>| {
        let n = v.len();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    };
    close("every-step gradient", &t(g.grads), &t(g_c.grads));
    close("every-step predictions", &t(p), &t(p_c));
    assert_eq!(g.sums.samples, (rows * steps * 2) as u64);
    assert_eq!(g.sums.samples, g_c.sums.samples);
}
