//! recur's cells against PyTorch: outputs, final states and every parameter's gradient for a
//! padded batch of lengths (3, 5, 1, 5), for every kind × {1, 2 layers} × {uni, bi}.
//!
//! The fixtures in `golden/cells/` come from `golden/gen_golden.py` (its `cells()` function):
//!
//! ```python
//! packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
//! out, h = self.rnn(packed)               # nn.RNN / nn.LSTM / nn.GRU, batch_first=True
//! top = torch.cat([h[-2], h[-1]], 1) if self.bi else h[-1]
//! y = self.linear(top)
//! loss = ((y - target) ** 2).mean(dim=1).sum(); loss.backward()
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use recur_core::model::{
    Forward, ModelConfig, ModelKind, PackedBatch, Params, ReferenceModel, SeqModel,
};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

struct Case {
    name: String,
    config: ModelConfig,
    tensors: HashMap<String, Tensor>,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for kind in ModelKind::ALL {
        for layers in [1, 2] {
            for bi in [false, true] {
                let name = format!("{kind}_l{layers}_{}", if bi { "bi" } else { "uni" });
                let path = golden_dir()
                    .join("cells")
                    .join(format!("{name}.safetensors"));
                let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
                let config = ModelConfig {
                    kind,
                    input_size: 2,
                    hidden_size: 3,
                    num_layers: layers,
                    bidirectional: bi,
                    output_size: 2,
                    head: Default::default(),
                };
                cases.push(Case {
                    name,
                    config,
                    tensors,
                });
            }
        }
    }
    cases
}

impl Case {
    fn params(&self) -> Params {
        let named: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("rnn.") || k.starts_with("linear."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Params::from_named(self.config, &named, &Device::Cpu).unwrap()
    }

    fn get(&self, name: &str) -> &Tensor {
        &self.tensors[name]
    }

    fn batch(&self, padding: Option<f32>) -> PackedBatch {
        let x = self.get("input");
        let (b, t, i) = x.dims3().unwrap();
        let lengths: Vec<usize> = self
            .get("lengths")
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&l| l as usize)
            .collect();
        let mut xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if let Some(pad) = padding {
            for (row, &len) in lengths.iter().enumerate() {
                for v in &mut xs[(row * t + len) * i..(row + 1) * t * i] {
                    *v = pad;
                }
            }
        }
        PackedBatch::from_padded(&xs, (b, t, i), &lengths, &Device::Cpu).unwrap()
    }
}

fn assert_close(name: &str, what: &str, got: &Tensor, expected: &Tensor) {
    assert_eq!(got.dims(), expected.dims(), "{name}: {what} shape");
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(
            (g - e).abs() <= 1e-5 * e.abs().max(1.0),
            "{name}: {what}[{k}] = {g}, PyTorch says {e}"
        );
    }
}

/// The loss of the fixtures: `sum_i mean_j (y_ij - target_ij)^2`, in sorted order.
fn loss(case: &Case, batch: &PackedBatch, ys: &Tensor) -> Tensor {
    let target = case.get("target").to_vec2::<f32>().unwrap().concat();
    let sorted = batch.sort_values(&target, case.config.output_size);
    let target = Tensor::from_vec(sorted, ys.shape(), &Device::Cpu).unwrap();
    ((ys - target).unwrap().sqr().unwrap().sum_all().unwrap() / case.config.output_size as f64)
        .unwrap()
}

/// The top layer's per-step outputs padded with zeros to `(b_sz, seq_len, width)`, input order.
fn padded_outputs(batch: &PackedBatch, outputs: &[Tensor]) -> Tensor {
    let b = batch.len();
    let steps: Vec<Tensor> = outputs
        .iter()
        .map(|o| {
            let (rows, width) = o.dims2().unwrap();
            if rows == b {
                o.clone()
            } else {
                let zeros = Tensor::zeros((b - rows, width), o.dtype(), o.device()).unwrap();
                Tensor::cat(&[o, &zeros], 0).unwrap()
            }
        })
        .collect();
    batch.unsort(&Tensor::stack(&steps, 1).unwrap()).unwrap()
}

/// One model's forward pass, with candle's graph.
type RunModel<'a> = dyn Fn(&PackedBatch) -> Forward + 'a;

/// The fused model and the per-step reference (the oracle the fused layers are tested against
/// on random batches) both match PyTorch.
#[test]
fn forward_states_and_gradients_match_pytorch() {
    for case in cases() {
        let fused = SeqModel::new(case.params());
        let reference = ReferenceModel::new(case.params());
        let runs: [(&str, &RunModel, &Params); 2] = [
            (
                "fused",
                &|b| fused.forward(b, true).unwrap(),
                fused.params(),
            ),
            (
                "reference",
                &|b| reference.forward(b, true).unwrap(),
                reference.params(),
            ),
        ];
        for (which, forward, params) in runs {
            let name = format!("{} ({which})", case.name);
            let batch = case.batch(None);
            let out = forward(&batch);
            assert_close(&name, "y", &batch.unsort(&out.ys).unwrap(), case.get("y"));
            let h_n: Vec<Tensor> = out.h_n.iter().map(|h| batch.unsort(h).unwrap()).collect();
            assert_close(
                &name,
                "h_n",
                &Tensor::stack(&h_n, 0).unwrap(),
                case.get("h_n"),
            );
            if case.config.kind == ModelKind::Lstm {
                let c_n: Vec<Tensor> = out.c_n.iter().map(|c| batch.unsort(c).unwrap()).collect();
                assert_close(
                    &name,
                    "c_n",
                    &Tensor::stack(&c_n, 0).unwrap(),
                    case.get("c_n"),
                );
            } else {
                assert!(out.c_n.is_empty());
            }
            assert_close(
                &name,
                "output",
                &padded_outputs(&batch, &out.outputs),
                case.get("output"),
            );
            let grads = loss(&case, &batch, &out.ys).backward().unwrap();
            assert!(
                grads.get(params.flat().as_tensor()).is_some(),
                "{name}: the loss does not reach the parameters"
            );
            for (pname, grad) in params.grads_named(&grads).unwrap() {
                assert_close(
                    &name,
                    &format!("grad of {pname}"),
                    &grad,
                    case.get(&format!("grad.{pname}")),
                );
            }
        }
    }
}

#[test]
fn padding_changes_no_output_and_no_gradient() {
    for case in cases() {
        let model = SeqModel::new(case.params());
        let run = |pad| {
            let batch = case.batch(Some(pad));
            let out = model.forward(&batch, false).unwrap();
            let grads = loss(&case, &batch, &out.ys).backward().unwrap();
            (
                out.ys.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                model.params().grads_flat(&grads).unwrap(),
            )
        };
        let a = run(0.0);
        assert!(a.1.iter().any(|g| *g != 0.0), "{}: no gradient", case.name);
        let b = run(-1e6);
        let c = run(f32::NAN);
        assert_eq!(a, b, "{}", case.name);
        assert_eq!(a, c, "{}", case.name);
    }
}

#[test]
fn batch_order_does_not_matter() {
    for case in cases().into_iter().filter(|c| c.config.num_layers == 2) {
        let model = SeqModel::new(case.params());
        let x = case.get("input");
        let (b, t, i) = x.dims3().unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let lengths = [3usize, 5, 1, 5];
        let seqs: Vec<&[f32]> = (0..b)
            .map(|r| &xs[r * t * i..(r * t + lengths[r]) * i])
            .collect();
        let forward = |order: &[usize]| {
            let shuffled: Vec<&[f32]> = order.iter().map(|&r| seqs[r]).collect();
            let batch = PackedBatch::new(&shuffled, i, &Device::Cpu).unwrap();
            let ys = batch
                .unsort(&model.forward(&batch, false).unwrap().ys)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut by_row = vec![Vec::new(); b];
            for (k, &r) in order.iter().enumerate() {
                by_row[r] = ys[k].clone();
            }
            by_row
        };
        let base = forward(&[0, 1, 2, 3]);
        for order in [[3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
            let other = forward(&order);
            for (a, b) in base.iter().zip(&other) {
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() < 1e-6, "{}: {a:?} vs {b:?}", case.name);
                }
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for case in cases()
        .into_iter()
        .filter(|c| c.config.num_layers == 2 && c.config.bidirectional)
    {
        let params = case.params();
        let model = SeqModel::new(params.clone());
        let batch = case.batch(None);
        let out = model.forward(&batch, false).unwrap();
        let analytic = params
            .grads_flat(&loss(&case, &batch, &out.ys).backward().unwrap())
            .unwrap();
        let base = params.to_flat().unwrap();
        let loss_at = |flat: &[f32]| {
            params.set_flat(flat).unwrap();
            let out = model.forward(&batch, false).unwrap();
            loss(&case, &batch, &out.ys).to_scalar::<f32>().unwrap() as f64
        };
        let eps = 1e-2f32;
        // Every third parameter keeps the test quick while touching every tensor.
        for k in (0..base.len()).step_by(3) {
            let mut plus = base.clone();
            plus[k] += eps;
            let mut minus = base.clone();
            minus[k] -= eps;
            let numeric = (loss_at(&plus) - loss_at(&minus)) / (2.0 * eps as f64);
            let a = analytic[k] as f64;
            assert!(
                (numeric - a).abs() <= 2e-3 * a.abs().max(1.0),
                "{}: d loss / d p[{k}]: analytic {a}, numeric {numeric}",
                case.name
            );
        }
        params.set_flat(&base).unwrap();
    }
}
