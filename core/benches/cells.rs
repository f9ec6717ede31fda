//! Training throughput of recur's fused layers, side by side in one process with the per-step
//! reference implementation and candle-nn's LSTM and GRU on the same batches, and with the
//! matrix-product peak of the same thread.
//!
//! ```text
//! cargo bench -p recur-core --bench cells                 # every workload and cell
//! cargo bench -p recur-core --bench cells -- W2 lstm      # filters: workload, then cell
//! cargo bench -p recur-core --bench cells -- W2 lstm fused  # and only one implementation
//! cargo bench -p recur-core --bench cells -- --json       # one JSON object per line as well
//! cargo bench -p recur-core --features cuda --bench cells -- W2 lstm fused --device cuda:0
//! ```
//! (`.cargo/config.toml` sets `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS` to 1 unless the
//! environment says otherwise.)
//!
//! Workloads: the tutorial's shape as one worker of two sees it (hidden 8, 50 rows of 5-10
//! values) and W2 (hidden 128, batch 256, 32,768 generated rows of 10-50 values). A measured
//! step is forward, backward and an Adam update. recur (fused and reference) runs packed, exact
//! batches; candle-nn runs the padded batch to its longest row (it has no masking), so its
//! figures are for less exact work. `% peak` is the step's matrix-product work (multiply-adds
//! × 2) over its time, against one thread's 1024² f32 product measured first; `peak MiB` is the
//! growth of the resident set during one step (Linux).

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer as _, RNN, VarBuilder, VarMap};
use recur_core::data::{BallConfig, Dataset, epoch_batches};
use recur_core::model::{ModelConfig, ModelKind, Params, ReferenceModel, SeqModel};
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

/// Time of the measured steps, split by phase.
#[derive(Default)]
struct Timing {
    forward: Duration,
    backward: Duration,
    update: Duration,
    peak_bytes: u64,
}

impl Timing {
    fn total(&self) -> Duration {
        self.forward + self.backward + self.update
    }
}

fn batches(w: &Workload) -> Vec<Vec<usize>> {
    let rows: Vec<usize> = (0..w.data.len()).collect();
    epoch_batches(&rows, w.batch, 0, 0)
        .into_iter()
        .filter(|b| b.len() == w.batch)
        .take(w.warmup + w.measured)
        .collect()
}

fn config(w: &Workload, kind: ModelKind) -> ModelConfig {
    ModelConfig {
        kind,
        hidden_size: w.hidden,
        ..ModelConfig::tutorial()
    }
}

/// Multiply-adds × 2 of one training step of a one-layer unidirectional model on `batch`:
/// forward (input projection, recurrent products) and backward (the recurrent products again,
/// weight gradients of both).
fn step_flops(kind: ModelKind, hidden: usize, batch: &Batch) -> f64 {
    let sizes = batch.packed().batch_sizes();
    let total: usize = sizes.iter().sum();
    let with_prev: usize = sizes.iter().skip(1).sum();
    let g = (kind.gates() * hidden) as f64;
    let h = hidden as f64;
    let recurrent = 2.0 * with_prev as f64 * h * g;
    let projection = 2.0 * total as f64 * g;
    // forward: recurrent + projection; backward: dh (recurrent), dW_hh (recurrent), dW_ih.
    3.0 * recurrent + 2.0 * projection
}

/// Resident-set bytes now and the peak since the last reset (Linux; zeros elsewhere).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn reset_peak_rss() {
    // "5" resets the peak resident set to the current one.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One training step of a model, with its phases timed.
trait Trainee {
    fn forward_backward(&mut self, batch: &Batch, t: &mut Timing);
    fn update(&mut self);
}

struct Recur<M> {
    dev: Device,
    model: M,
    flat: Vec<f32>,
    grads: Vec<f32>,
    opt: Optimizer,
}

impl Trainee for Recur<SeqModel> {
    fn forward_backward(&mut self, batch: &Batch, t: &mut Timing) {
        // The step as a worker runs it, timed whole; then a forward pass alone, after it, to
        // split the time (that forward finds warm caches, so the split leans towards forward).
        let t0 = Instant::now();
        self.grads = grad_sum(
            &self.model,
            batch,
            &[recur_core::data::Affine::divide(1.0)],
            recur_core::step::Loss::Mse,
            None,
        )
        .unwrap()
        .grads;
        let t1 = Instant::now();
        drop(self.model.forward(batch.packed(), false).unwrap());
        // A GPU queues the work: the forward pass ends when the device has run it.
        self.dev.synchronize().unwrap();
        let forward = t1.elapsed().min(t1 - t0);
        t.forward += forward;
        t.backward += (t1 - t0) - forward;
    }

    fn update(&mut self) {
        self.opt.step(&mut self.flat, &self.grads).unwrap();
        self.model.params().set_flat(&self.flat).unwrap();
    }
}

impl Trainee for Recur<ReferenceModel> {
    fn forward_backward(&mut self, batch: &Batch, t: &mut Timing) {
        let t0 = Instant::now();
        let out = self.model.forward(batch.packed(), false).unwrap();
        self.dev.synchronize().unwrap();
        let t1 = Instant::now();
        let targets = Tensor::from_slice(
            &vec![0.5f32; out.ys.dim(0).unwrap()],
            out.ys.shape(),
            out.ys.device(),
        )
        .unwrap();
        let loss = (&out.ys - targets)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        self.grads = self
            .model
            .params()
            .grads_flat(&loss.backward().unwrap())
            .unwrap();
        t.forward += t1 - t0;
        t.backward += t1.elapsed();
    }

    fn update(&mut self) {
        self.opt.step(&mut self.flat, &self.grads).unwrap();
        self.model.params().set_flat(&self.flat).unwrap();
    }
}

fn recur<M>(w: &Workload, kind: ModelKind, wrap: fn(Params) -> M, dev: &Device) -> Recur<M> {
    let params = Params::init(config(w, kind), 0, dev).unwrap();
    let flat = params.to_flat().unwrap();
    Recur {
        opt: Optimizer::new(OptimizerConfig::adam(1e-3), flat.len()).unwrap(),
        grads: vec![0.0; flat.len()],
        model: wrap(params),
        flat,
        dev: dev.clone(),
    }
}

/// Runs warm-up and measured steps; returns the timing of the measured ones.
fn run(w: &Workload, trainee: &mut dyn Trainee, packed: &[Batch]) -> Timing {
    let mut t = Timing::default();
    for (i, batch) in packed.iter().enumerate() {
        if i == w.warmup {
            t = Timing::default();
        }
        let (before, _) = rss();
        reset_peak_rss();
        trainee.forward_backward(batch, &mut t);
        let t0 = Instant::now();
        trainee.update();
        t.update += t0.elapsed();
        let (_, peak) = rss();
        t.peak_bytes = t.peak_bytes.max(peak.saturating_sub(before));
    }
    t
}

/// candle-nn's LSTM or GRU over the padded batch, with a linear head and candle-nn's AdamW
/// (weight decay 0, i.e. Adam). Returns seconds of the measured steps.
fn bench_candle_nn(w: &Workload, kind: ModelKind, batches: &[Vec<usize>], dev: &Device) -> f64 {
    let dev = dev.clone();
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
            let ys: Vec<f32> = rows.iter().map(|&r| w.data.targets(r)[0]).collect();
            (
                Tensor::from_vec(xs, (rows.len(), t, 1), &dev).unwrap(),
                Tensor::from_vec(ys, (rows.len(), 1), &dev).unwrap(),
            )
        })
        .collect();
    let mut start = Instant::now();
    for (i, (xs, ys)) in padded.iter().enumerate() {
        if i == w.warmup {
            // The warm-up's queued work is not the measured steps'.
            dev.synchronize().unwrap();
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
    dev.synchronize().unwrap();
    start.elapsed().as_secs_f64()
}

/// Writes the batches (each row's normalised values, target last) as JSON, for
/// `bench/pytorch_w2.py` to run PyTorch on exactly the same work.
fn dump_batches(path: &str, w: &Workload, batches: &[Vec<usize>]) {
    let rows = |b: &Vec<usize>| -> Vec<Vec<f32>> {
        b.iter()
            .map(|&r| {
                let mut v = w.data.input(r).to_vec();
                v.push(w.data.targets(r)[0]);
                v
            })
            .collect()
    };
    let body = serde_json::json!({
        "workload": w.name,
        "hidden": w.hidden,
        "warmup": w.warmup,
        "batches": batches.iter().map(rows).collect::<Vec<_>>(),
    });
    std::fs::write(path, body.to_string()).unwrap();
}

/// GFLOP/s of one 1024² f32 matrix product on this thread (or GPU), best of a few.
fn matmul_peak(dev: &Device) -> f64 {
    let n = 1024;
    let a = Tensor::rand(-1f32, 1f32, (n, n), dev).unwrap();
    let b = Tensor::rand(-1f32, 1f32, (n, n), dev).unwrap();
    let mut best = f64::MAX;
    for _ in 0..8 {
        let t = Instant::now();
        let c = a.matmul(&b).unwrap();
        dev.synchronize().unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        drop(c);
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// `cpu` or `cuda:N` (the latter in a build with `--features cuda`).
fn device(name: &str) -> Device {
    match name.strip_prefix("cuda:").map(str::parse::<usize>) {
        Some(Ok(n)) => Device::new_cuda(n).unwrap_or_else(|e| panic!("--device {name}: {e}")),
        _ if name == "cpu" => Device::Cpu,
        _ => panic!("--device {name:?}: expected cpu or cuda:N"),
    }
}

fn main() {
    // Positional filters (workload, cell, implementation), `--json`, `--dump-batches FILE`,
    // `--device cpu|cuda:N`; cargo's own `--bench` is ignored.
    let mut json = false;
    let mut dump = None;
    let mut dev = Device::Cpu;
    let mut filters: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--dump-batches" => dump = args.next(),
            "--device" => dev = device(&args.next().unwrap_or_default()),
            _ if a.starts_with("--") => {}
            _ => filters.push(a),
        }
    }
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    let peak = matmul_peak(&dev);
    let on = if dev.is_cuda() {
        "the GPU"
    } else {
        "this thread"
    };
    println!(
        "recur-core cell benchmark (CANDLE_NUM_THREADS={threads}, device {dev:?}); forward+backward+Adam per step"
    );
    println!("matmul peak of {on} (1024² f32): {peak:.1} GFLOP/s");
    let workloads = [
        Workload {
            name: "tutorial h8 b50",
            data: BallConfig::tutorial(0).generate().unwrap().scaled(50.0),
            hidden: 8,
            batch: 50,
            warmup: 50,
            measured: 150,
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
        "{:<16} {:<9} {:>11} {:>11} {:>11} {:>7} {:>7}   {:>9} {:>9} {:>8} {:>7} {:>9}",
        "workload",
        "cell",
        "fused/s",
        "reference/s",
        "candle-nn/s",
        "÷ref",
        "÷nn",
        "µs/step",
        "fwd µs",
        "bwd µs",
        "% peak",
        "peak MiB"
    );
    for w in &workloads {
        if filters.first().is_some_and(|f| !w.name.contains(f)) {
            continue;
        }
        let batches = batches(w);
        if let Some(path) = &dump {
            dump_batches(path, w, &batches);
        }
        let packed: Vec<Batch> = batches
            .iter()
            .map(|rows| Batch::from_rows(&w.data, rows, &dev).unwrap())
            .collect();
        for kind in [ModelKind::RnnTanh, ModelKind::Lstm, ModelKind::Gru] {
            if filters
                .get(1)
                .is_some_and(|f| !f.is_empty() && kind.as_str() != *f)
            {
                continue;
            }
            let only = |name: &str| filters.get(2).is_none_or(|f| *f == name);
            let fused = run(w, &mut recur(w, kind, SeqModel::new, &dev), &packed);
            let reference = if only("reference") {
                run(w, &mut recur(w, kind, ReferenceModel::new, &dev), &packed)
            } else {
                Timing {
                    update: Duration::MAX / 4,
                    ..Timing::default()
                }
            };
            let nn = (kind != ModelKind::RnnTanh && only("candle-nn"))
                .then(|| bench_candle_nn(w, kind, &batches, &dev));
            let samples = (w.measured * w.batch) as f64;
            let rate = |secs: f64| samples / secs;
            let fused_rate = rate(fused.total().as_secs_f64());
            let ref_rate = rate(reference.total().as_secs_f64());
            let nn_rate = nn.map(rate);
            let flops: f64 = packed[w.warmup..]
                .iter()
                .map(|b| step_flops(kind, w.hidden, b))
                .sum();
            let share = flops / fused.total().as_secs_f64() / 1e9 / peak * 100.0;
            let per = |d: Duration| d.as_secs_f64() * 1e6 / w.measured as f64;
            let mib = fused.peak_bytes as f64 / (1024.0 * 1024.0);
            println!(
                "{:<16} {:<9} {:>11.0} {:>11.0} {:>11} {:>6.2}x {:>7}   {:>9.1} {:>9.1} {:>8.1} {:>7.1} {:>9.1}",
                w.name,
                kind.as_str(),
                fused_rate,
                ref_rate,
                nn_rate.map_or("-".into(), |r| format!("{r:.0}")),
                fused_rate / ref_rate,
                nn_rate.map_or("-".into(), |r| format!("{:.2}x", fused_rate / r)),
                per(fused.total()),
                per(fused.forward),
                per(fused.backward),
                share,
                mib,
            );
            if json {
                println!(
                    "{{\"workload\":\"{}\",\"cell\":\"{}\",\"fused_samples_per_s\":{fused_rate:.1},\"reference_samples_per_s\":{ref_rate:.1},\"candle_nn_samples_per_s\":{},\"us_per_step\":{:.2},\"peak_share\":{share:.2},\"peak_mib\":{mib:.2},\"matmul_gflops\":{peak:.2}}}",
                    w.name,
                    kind.as_str(),
                    nn_rate.map_or("null".into(), |r| format!("{r:.1}")),
                    per(fused.total()),
                );
            }
        }
    }
}
