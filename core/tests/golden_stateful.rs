//! Truncated backpropagation through time against PyTorch. The fixtures in `golden/stateful/`
//! come from `golden/gen_golden.py` (its `stateful()` function): three streams of one series run
//! chunk by chunk through a two-layer model with a head at every step, each chunk starting from
//! the state its stream ended the previous chunk with, detached, and an SGD step (lr 0.1) after
//! each chunk. recur runs the same chunks as a stateful run cuts them ([`stream_batches`]) with
//! [`stateful_grad_sum`], carrying the states it returns, and must give PyTorch's losses,
//! gradients, final states and parameters at every chunk.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use recur_core::data::{Affine, Dataset, stream_batches};
use recur_core::model::{HeadLayers, ModelConfig, ModelKind, Params, ReferenceModel};
use recur_core::step::{Batch, Loss, stateful_grad_sum};

fn load(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/stateful")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn values(t: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    t.get(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_close(case: &str, what: &str, got: &[f32], expected: &[f32]) {
    common::assert_close(case, what, got, expected, 2e-5);
}

#[test]
fn stateful_chunks_train_as_pytorch_tbptt_does() {
    for (case, kind, loss) in [
        ("gru_l2_bce", ModelKind::Gru, Loss::Bce),
        ("lstm_l2_mse", ModelKind::Lstm, Loss::Mse),
        ("rnn_tanh_l2_mse", ModelKind::RnnTanh, Loss::Mse),
    ] {
        let t = load(case);
        let config = ModelConfig {
            kind,
            input_size: 2,
            hidden_size: 3,
            num_layers: 2,
            bidirectional: false,
            output_size: 2,
            head: HeadLayers::default(),
        };
        let named = |prefix: &str| -> HashMap<String, Tensor> {
            t.iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
                .collect()
        };
        let params = Params::from_named(config, &named("init."), &Device::Cpu).unwrap();
        let model = ReferenceModel::new(params.clone());
        let (streams, length, features) = t["input"].dims3().unwrap();
        let (window, outputs, hidden, layers) = (4, 2, 3, 2);
        let chunks = length / window;
        // The series as a stateful run holds it: stream k's chunks are consecutive rows.
        let (xs, ys) = (values(&t, "input"), values(&t, "target"));
        let mut data = Dataset::every_step(features, window, outputs);
        for k in 0..streams {
            for j in 0..chunks {
                let at = k * length + j * window;
                let mut row = xs[at * features..(at + window) * features].to_vec();
                row.extend_from_slice(&ys[at * outputs..(at + window) * outputs]);
                data.push_row(&row);
            }
        }
        let rows: Vec<usize> = (0..data.len()).collect();
        let batches = stream_batches(&rows, streams);
        assert_eq!(batches.len(), chunks);
        let mut flat = params.to_flat().unwrap();
        let mut state: Option<Vec<f32>> = None;
        let per = config.state_len();
        for (j, rows) in batches.iter().enumerate() {
            let batch = Batch::from_rows(&data, rows, &Device::Cpu).unwrap();
            let (g, end) = stateful_grad_sum(
                &model,
                &batch,
                &[Affine::divide(1.0); 2],
                loss,
                state.as_deref(),
            )
            .unwrap();
            // PyTorch's loss is the mean over streams, steps and outputs; recur sums samples.
            let n = (streams * window * outputs) as f64;
            assert_close(
                case,
                &format!("chunk {j} loss"),
                &[(g.sums.squared_error / n) as f32],
                &values(&t, &format!("chunk{j}.loss")),
            );
            let grads: Vec<f32> = g.grads.iter().map(|v| v / streams as f32).collect();
            for e in config.layout().entries() {
                assert_close(
                    case,
                    &format!("chunk {j} grad of {}", e.name),
                    &grads[e.offset..e.offset + e.len],
                    &values(&t, &format!("chunk{j}.grad.{}", e.name)),
                );
            }
            // Final states: recur's per stream (h of each layer, then c), PyTorch's per layer.
            let h = values(&t, &format!("chunk{j}.h"));
            let c = (kind == ModelKind::Lstm).then(|| values(&t, &format!("chunk{j}.c")));
            for k in 0..streams {
                for l in 0..layers {
                    let torch = |v: &[f32]| v[(l * streams + k) * hidden..][..hidden].to_vec();
                    let ours = |slot: usize| end[k * per + slot * hidden..][..hidden].to_vec();
                    let what = format!("chunk {j} stream {k} layer {l}");
                    assert_close(case, &format!("{what} h"), &ours(l), &torch(&h));
                    if let Some(c) = &c {
                        assert_close(case, &format!("{what} c"), &ours(layers + l), &torch(c));
                    }
                }
            }
            for (p, g) in flat.iter_mut().zip(&grads) {
                *p -= 0.1 * g;
            }
            params.set_flat(&flat).unwrap();
            state = Some(end);
        }
        let last = Params::from_named(config, &named("final."), &Device::Cpu).unwrap();
        assert_close(case, "final parameters", &flat, &last.to_flat().unwrap());
    }
}
