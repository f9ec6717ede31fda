//! MLP heads, dropout, BCE and outputs at every step against PyTorch. The fixtures in `golden/heads/` come from
//! `golden/gen_golden.py` (its `heads()` function): one recurrent layer under
//! `nn.Sequential(Linear, ReLU, Dropout, …, Linear)`, run in training mode with given dropout
//! masks, its loss (MSE, or `binary_cross_entropy_with_logits(reduction="sum") / outputs`)
//! back-propagated, and run again in eval mode (nn.Dropout off).
//!
//! The state dict is loaded by name with [`Params::from_named`], which refuses a missing, extra
//! or misshapen tensor: a checkpoint of these models has PyTorch's names and shapes, so it loads
//! into the same module with `load_state_dict` (strict).

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use recur_core::data::Affine;
use recur_core::model::{
    HeadLayers, ModelConfig, ModelKind, PackedBatch, Params, ReferenceModel, SeqModel,
};
use recur_core::step::{Batch, Loss, grad_sum, predict};

struct Case {
    name: &'static str,
    config: ModelConfig,
    loss: Loss,
    tensors: HashMap<String, Tensor>,
}

fn cases() -> Vec<Case> {
    [
        ("gru_mse", ModelKind::Gru, &[5, 4][..], Loss::Mse),
        ("lstm_bce", ModelKind::Lstm, &[6][..], Loss::Bce),
        ("rnn_tanh_bce", ModelKind::RnnTanh, &[4, 3][..], Loss::Bce),
    ]
    .into_iter()
    .map(|(name, kind, widths, loss)| {
        let config = ModelConfig {
            kind,
            input_size: 2,
            hidden_size: 3,
            num_layers: 1,
            bidirectional: false,
            output_size: 2,
            head: HeadLayers::new(widths).unwrap(),
        };
        fixture("heads", name, config, loss)
    })
    .collect()
}

impl Case {
    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor {name}", self.name))
    }

    fn values(&self, name: &str) -> Vec<f32> {
        self.get(name)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// The state dict alone, as `torch.save(model.state_dict())` would hold it.
    fn params(&self) -> Params {
        let named: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| {
                k.starts_with("rnn.") || k.starts_with("head.") || k.starts_with("linear.")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Params::from_named(self.config, &named, &Device::Cpu).unwrap()
    }

    fn lengths(&self) -> Vec<usize> {
        self.values("lengths").iter().map(|&l| l as usize).collect()
    }

    fn batch(&self) -> PackedBatch {
        let x = self.get("input");
        PackedBatch::from_padded(
            &self.values("input"),
            x.dims3().unwrap(),
            &self.lengths(),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// The dropout masks in the batch's sorted order.
    fn masks(&self, batch: &PackedBatch) -> Vec<Tensor> {
        self.config
            .head
            .widths()
            .enumerate()
            .map(|(i, w)| {
                let sorted = batch.sort_values(&self.values(&format!("mask.{i}")), w);
                Tensor::from_vec(sorted, (batch.len(), w), &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// The fixture's loss of the head's outputs `ys` (sorted order).
    fn loss(&self, batch: &PackedBatch, ys: &Tensor) -> Tensor {
        let outputs = self.config.output_size;
        let t = batch.sort_values(&self.values("target"), outputs);
        let t = Tensor::from_vec(t, ys.shape(), &Device::Cpu).unwrap();
        let per = per_value_loss(self.loss, ys, &t);
        (per.sum_all().unwrap() / outputs as f64).unwrap()
    }
}

/// Each value's loss: `(y - t)^2`, or BCE with logits in the stable form PyTorch uses,
/// `max(x, 0) - x t + log(1 + exp(-|x|))`.
fn per_value_loss(loss: Loss, ys: &Tensor, t: &Tensor) -> Tensor {
    match loss {
        Loss::Mse => (ys - t).unwrap().sqr().unwrap(),
        Loss::Bce => {
            let softplus = ((ys.abs().unwrap().neg().unwrap().exp().unwrap() + 1.0).unwrap())
                .log()
                .unwrap();
            ((ys.relu().unwrap() - (ys * t).unwrap()).unwrap() + softplus).unwrap()
        }
    }
}

/// A fixture of `golden/every_step/`: a two-layer model of 2 features, 3 units and 2 outputs
/// under one linear layer.
fn every_step_case(name: &'static str, kind: ModelKind, bidirectional: bool, loss: Loss) -> Case {
    let config = ModelConfig {
        kind,
        input_size: 2,
        hidden_size: 3,
        num_layers: 2,
        bidirectional,
        output_size: 2,
        head: HeadLayers::default(),
    };
    fixture("every_step", name, config, loss)
}

/// The fixture `golden/{dir}/{name}.safetensors` of a model shaped `config`.
fn fixture(dir: &str, name: &'static str, config: ModelConfig, loss: Loss) -> Case {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(dir)
        .join(format!("{name}.safetensors"));
    Case {
        name,
        config,
        loss,
        tensors: candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(case: &str, what: &str, got: &[f32], expected: &[f32]) {
    common::assert_close(case, what, got, expected, 1e-5);
}

/// Training mode with the fixture's masks: outputs, loss and every gradient match PyTorch's.
#[test]
fn mlp_heads_with_dropout_train_as_pytorch_does() {
    for case in cases() {
        let model = SeqModel::new(case.params());
        let batch = case.batch();
        let out = model
            .forward_train(&batch, &case.masks(&batch), false)
            .unwrap();
        assert_close(
            case.name,
            "y (train)",
            &flat(&batch.unsort(&out.ys).unwrap()),
            &case.values("y"),
        );
        let loss = case.loss(&batch, &out.ys);
        assert_close(case.name, "loss", &flat(&loss), &case.values("loss"));
        let grads = loss.backward().unwrap();
        for (pname, grad) in model.params().grads_named(&grads).unwrap() {
            assert_close(
                case.name,
                &format!("grad of {pname}"),
                &flat(&grad),
                &case.values(&format!("grad.{pname}")),
            );
        }
    }
}

/// Evaluation runs without dropout, as `model.eval()` does: the fused model's predictions, the
/// per-step reference's and PyTorch's eval-mode outputs agree.
#[test]
fn mlp_heads_predict_as_pytorch_eval_mode() {
    for case in cases() {
        let xs = case.values("input");
        let (b, t, i) = case.get("input").dims3().unwrap();
        let rows: Vec<&[f32]> = case
            .lengths()
            .iter()
            .enumerate()
            .map(|(r, &len)| &xs[r * t * i..(r * t + len) * i])
            .collect();
        assert_eq!(rows.len(), b);
        let batch = Batch::from_inputs(&rows, i, &Device::Cpu).unwrap();
        let fused = predict(&SeqModel::new(case.params()), &batch).unwrap();
        assert_close(case.name, "y (eval)", &fused, &case.values("y_eval"));
        let reference = ReferenceModel::new(case.params())
            .forward(batch.packed(), false)
            .unwrap();
        assert_close(
            case.name,
            "y (eval, reference)",
            &flat(&batch.packed().unsort(&reference.ys).unwrap()),
            &case.values("y_eval"),
        );
    }
}

/// The production training step (`grad_sum`, BCE with logits, no dropout) on the case PyTorch
/// ran without dropout: the same gradient and loss.
#[test]
fn the_bce_training_step_matches_pytorch() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "rnn_tanh_bce")
        .unwrap();
    let xs = case.values("input");
    let (_, t, i) = case.get("input").dims3().unwrap();
    let targets = case.values("target");
    let mut data = recur_core::data::Dataset::with_shape(i, 2);
    for (r, &len) in case.lengths().iter().enumerate() {
        let mut row = xs[r * t * i..(r * t + len) * i].to_vec();
        row.extend_from_slice(&targets[r * 2..r * 2 + 2]);
        data.push_row(&row);
    }
    let rows: Vec<usize> = (0..data.len()).collect();
    let batch = Batch::from_rows(&data, &rows, &Device::Cpu).unwrap();
    let model = SeqModel::new(case.params());
    let g = grad_sum(&model, &batch, &[Affine::divide(1.0); 2], Loss::Bce, None).unwrap();
    // The summed BCE over all outputs, per output: PyTorch's loss.
    assert_close(
        case.name,
        "loss",
        &[(g.sums.squared_error / 2.0) as f32],
        &case.values("loss"),
    );
    let layout = case.config.layout();
    for entry in layout.entries() {
        assert_close(
            case.name,
            &format!("grad of {}", entry.name),
            &g.grads[entry.offset..entry.offset + entry.len],
            &case.values(&format!("grad.{}", entry.name)),
        );
    }
}

/// A target at every step (`golden/every_step/`, from `gen_golden.py`'s `every_step()`): a
/// two-layer model whose linear head runs on every real step's output; each sample's loss is the
/// mean over its real steps and outputs. The head's outputs and every gradient match PyTorch's.
#[test]
fn outputs_at_every_step_train_as_pytorch_does() {
    for (name, kind, bidirectional, loss) in [
        ("gru_l2_uni_mse", ModelKind::Gru, false, Loss::Mse),
        ("lstm_l2_bi_bce", ModelKind::Lstm, true, Loss::Bce),
    ] {
        let case = every_step_case(name, kind, bidirectional, loss);
        let model = SeqModel::new(case.params());
        let batch = case.batch();
        let out = model.forward_train(&batch, &[], true).unwrap();
        // PyTorch's padded (b, t, 2) outputs and targets, read at each sorted sequence's steps.
        let (_, t_max, _) = case.get("y").dims3().unwrap();
        let (y, target) = (case.values("y"), case.values("target"));
        let lengths = batch.sorted_lengths();
        let mut want = Vec::new();
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for (&k, &len) in batch.order().iter().zip(&lengths) {
            for t in 0..len {
                let at = (k * t_max + t) * 2;
                want.extend_from_slice(&y[at..at + 2]);
                targets.extend_from_slice(&target[at..at + 2]);
                weights.extend([1.0 / (len as f32 * 2.0); 2]);
            }
        }
        assert_close(name, "y (every step)", &flat(&out.ys), &want);
        let shape = out.ys.shape().clone();
        let t = Tensor::from_vec(targets, &shape, &Device::Cpu).unwrap();
        let w = Tensor::from_vec(weights, &shape, &Device::Cpu).unwrap();
        let per = per_value_loss(loss, &out.ys, &t);
        let total = (per * w).unwrap().sum_all().unwrap();
        assert_close(name, "loss", &flat(&total), &case.values("loss"));
        let grads = total.backward().unwrap();
        for (pname, grad) in model.params().grads_named(&grads).unwrap() {
            assert_close(
                name,
                &format!("grad of {pname}"),
                &flat(&grad),
                &case.values(&format!("grad.{pname}")),
            );
        }
    }
}

/// recur's own training step (`grad_sum` over a dataset with a target at every step, rows of
/// equal length as a series' windows) on the equal-length fixture: PyTorch's loss (each sample's
/// mean over its steps and outputs, summed) and every gradient.
#[test]
fn the_every_step_training_step_matches_pytorch() {
    let case = every_step_case(
        "rnn_tanh_l2_uni_bce_equal",
        ModelKind::RnnTanh,
        false,
        Loss::Bce,
    );
    let (b, steps, features) = case.get("input").dims3().unwrap();
    let (xs, targets) = (case.values("input"), case.values("target"));
    let mut data = recur_core::data::Dataset::every_step(features, steps, 2);
    for r in 0..b {
        let mut row = xs[r * steps * features..(r + 1) * steps * features].to_vec();
        row.extend_from_slice(&targets[r * steps * 2..(r + 1) * steps * 2]);
        data.push_row(&row);
    }
    let model = SeqModel::new(case.params());
    let rows: Vec<usize> = (0..b).collect();
    let batch = Batch::from_rows(&data, &rows, &Device::Cpu).unwrap();
    let g = grad_sum(&model, &batch, &[Affine::divide(1.0); 2], Loss::Bce, None).unwrap();
    assert_eq!(g.sums.samples as usize, b * steps * 2);
    assert_close(
        case.name,
        "loss",
        &[(g.sums.squared_error / (steps * 2) as f64) as f32],
        &case.values("loss"),
    );
    for entry in case.config.layout().entries() {
        assert_close(
            case.name,
            &format!("grad of {}", entry.name),
            &g.grads[entry.offset..entry.offset + entry.len],
            &case.values(&format!("grad.{}", entry.name)),
        );
    }
}
