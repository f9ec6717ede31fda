//! Training throughput of recur's cells, side by side with candle-nn's LSTM and GRU on the same
//! batches in the same process.
//!
//! ```text
//! CANDLE_NUM_THREADS=1 RAYON_NUM_THREADS=1 cargo bench -p recur-core --bench cells
//! ```
//! (`.cargo/config.toml` sets both to 1 unless the environment says otherwise.)
//!
//! Workloads: the tutorial's (hidden 8, batch 100, ball rows of 5-10 values) and W2 (hidden 128,
//! batch 256, 32,768 generated rows of 10-50 values). Each measured step is forward, backward
//! and an Adam update. recur runs packed, exact batches; candle-nn runs the padded batch to its
//! longest row (it has no masking), so its numbers are for less exact work. Figures are samples
//! per second, with recur's step split into forward / backward / update time.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer as _, RNN, VarBuilder, VarMap};
use recur_core::data::{BallConfig, Dataset, epoch_batches};
use recur_core::model::{ModelConfig, ModelKind, Params, SeqModel};
use recur_core::optim::{Optimizer, OptimizerConfig};
use recur_core::step::{Batch, grad_sum};

struct Workload {
    name: &'static str,
    data: Dataset,
    hidden: usize,
    batch: usize,
    warmup: usize,
    measured: usize,
}

#[derive(Default)]
struct Split {
    forward: Duration,
    backward: Duration,
    update: Duration,
}

fn batches(w: &Workload) -> Vec<Vec<usize>> {
    let rows: Vec<usize> = (0..w.data.len()).collect();
    epoch_batches(&rows, w.batch, 0, 0)
        .into_iter()
        .filter(|b| b.len() == w.batch)
        .take(w.warmup + w.measured)
        .collect()
}

/// recur: returns samples/s and the time split of the measured steps.
fn bench_recur(w: &Workload, kind: ModelKind, batches: &[Vec<usize>]) -> (f64, Split) {
    let config = ModelConfig {
        kind,
        hidden_size: w.hidden,
        ..ModelConfig::tutorial()
    };
    let params = Params::init(config, 0, &Device::Cpu).unwrap();
    let mut flat = params.to_flat().unwrap();
    let model = SeqModel::new(params);
    let mut opt = Optimizer::new(OptimizerConfig::adam(1e-3), flat.len()).unwrap();
    let packed: Vec<Batch> = batches
        .iter()
        .map(|rows| Batch::from_rows(&w.data, rows, &Device::Cpu).unwrap())
        .collect();
    let mut split = Split::default();
    let mut start = Instant::now();
    for (i, batch) in packed.iter().enumerate() {
        if i == w.warmup {
            split = Split::default();
            start = Instant::now();
        }
        let t0 = Instant::now();
        let out = model.forward(batch.packed(), false).unwrap();
        let t1 = Instant::now();
        split.forward += t1 - t0;
        // grad_sum repeats the forward; subtract it to get the backward share.
        let g = grad_sum(&model, batch, 1.0).unwrap();
        let t2 = Instant::now();
        split.backward += (t2 - t1).saturating_sub(t1 - t0);
        opt.step(&mut flat, &g.grads).unwrap();
        model.params().set_flat(&flat).unwrap();
        split.update += t2.elapsed();
        drop(out);
    }
    let secs = (start.elapsed() - split.forward).as_secs_f64();
    ((w.measured * w.batch) as f64 / secs, split)
}

/// candle-nn's LSTM or GRU over the padded batch, with a linear head and candle-nn's AdamW
/// (weight decay 0, i.e. Adam).
fn bench_candle_nn(w: &Workload, kind: ModelKind, batches: &[Vec<usize>]) -> f64 {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let head = candle_nn::linear(w.hidden, 1, vb.pp("linear")).unwrap();
    enum Cell {
        Lstm(candle_nn::LSTM),
        Gru(candle_nn::GRU),
    }
    let cell = match kind {
        ModelKind::Lstm => {
            Cell::Lstm(candle_nn::lstm(1, w.hidden, Default::default(), vb.pp("rnn")).unwrap())
        }
        ModelKind::Gru => {
            Cell::Gru(candle_nn::gru(1, w.hidden, Default::default(), vb.pp("rnn")).unwrap())
        }
        _ => unreachable!("candle-nn has no plain RNN"),
    };
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let padded: Vec<(Tensor, Tensor)> = batches
        .iter()
        .map(|rows| {
            let t = rows.iter().map(|&r| w.data.steps(r)).max().unwrap();
            let mut xs = vec![0f32; rows.len() * t];
            for (k, &r) in rows.iter().enumerate() {
                xs[k * t..k * t + w.data.steps(r)].copy_from_slice(w.data.input(r));
            }
            let ys: Vec<f32> = rows.iter().map(|&r| w.data.target(r)).collect();
            (
                Tensor::from_vec(xs, (rows.len(), t, 1), &dev).unwrap(),
                Tensor::from_vec(ys, (rows.len(), 1), &dev).unwrap(),
            )
        })
        .collect();
    let mut start = Instant::now();
    for (i, (xs, ys)) in padded.iter().enumerate() {
        if i == w.warmup {
            start = Instant::now();
        }
        let last = match &cell {
            Cell::Lstm(l) => l.seq(xs).unwrap().last().unwrap().h().clone(),
            Cell::Gru(g) => g.seq(xs).unwrap().last().unwrap().h().clone(),
        };
        let pred = head.forward(&last).unwrap();
        let loss = (pred - ys).unwrap().sqr().unwrap().mean_all().unwrap();
        opt.backward_step(&loss).unwrap();
    }
    (w.measured * w.batch) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    println!(
        "recur-core cell benchmark (CANDLE_NUM_THREADS={threads}); samples/s of forward+backward+Adam"
    );
    let workloads = [
        Workload {
            name: "tutorial h8 b100",
            data: BallConfig::tutorial(0).generate().unwrap().scaled(50.0),
            hidden: 8,
            batch: 100,
            warmup: 10,
            measured: 90,
        },
        Workload {
            name: "W2 h128 b256",
            data: BallConfig::w2(0).generate().unwrap().scaled(50.0),
            hidden: 128,
            batch: 256,
            warmup: 2,
            measured: 12,
        },
    ];
    println!(
        "{:<18} {:<9} {:>12} {:>14} {:>8}   {:>8} {:>9} {:>7}",
        "workload", "cell", "recur", "candle-nn", "ratio", "fwd ms", "bwd ms", "upd ms"
    );
    for w in &workloads {
        let batches = batches(w);
        for kind in [ModelKind::RnnTanh, ModelKind::Lstm, ModelKind::Gru] {
            let (ours, split) = bench_recur(w, kind, &batches);
            let reference =
                (kind != ModelKind::RnnTanh).then(|| bench_candle_nn(w, kind, &batches));
            let per = |d: Duration| d.as_secs_f64() * 1e3 / w.measured as f64;
            println!(
                "{:<18} {:<9} {:>12.0} {:>14} {:>8}   {:>8.3} {:>9.3} {:>7.3}",
                w.name,
                kind.as_str(),
                ours,
                reference.map_or("-".into(), |r| format!("{r:.0}")),
                reference.map_or("-".into(), |r| format!("{:.2}x", ours / r)),
                per(split.forward),
                per(split.backward),
                per(split.update),
            );
        }
    }
}
