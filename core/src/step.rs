//! One training or evaluation pass over a batch of dataset rows: the piece every trainer (the
//! single-process one here, the cluster's workers) runs.

use candle_core::{Device, Tensor};

use crate::Result;
use serde::{Deserialize, Serialize};

use crate::data::{Affine, Dataset, Normalizer};
use crate::metrics::BatchSums;
use crate::model::{Dropout, PackedBatch, ReferenceModel, SeqModel};

/// What a model is trained to minimise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// Mean squared error on normalised values (regression; `nn.MSELoss`).
    #[default]
    Mse,
    /// Binary cross-entropy of the head's logits against 0/1 labels
    /// (`nn.BCEWithLogitsLoss`); predictions are probabilities.
    Bce,
}

impl Loss {
    /// `mse` or `bce`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mse => "mse",
            Self::Bce => "bce",
        }
    }

    /// The head's outputs (normalised, `targets` per sequence) in the data's terms: values in
    /// the data's units for MSE, the probability of label 1 for BCE.
    pub fn outputs(self, norm: &Normalizer, outputs: &[f32]) -> Vec<f32> {
        match self {
            Self::Mse => norm.outputs(outputs),
            Self::Bce => outputs.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        }
    }

    /// The metric sums of `outputs` against `targets` (both normalised, sorted order).
    pub fn sums(self, targets: &[f32], outputs: &[f32], maps: &[Affine]) -> BatchSums {
        match self {
            Self::Mse => BatchSums::of(targets, outputs, maps),
            Self::Bce => BatchSums::of_labels(targets, outputs),
        }
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Rows of a (normalised) dataset, packed for the model, with their targets in sorted order.
#[derive(Debug, Clone)]
pub struct Batch {
    packed: PackedBatch,
    targets: Vec<f32>,
    /// Targets at every step (`outputs` per step) rather than after the last.
    every_step: bool,
}

impl Batch {
    /// Packs `rows` of `data`: each row's input steps (`data.features()` values each), and its
    /// targets in the packed (sorted) order.
    pub fn from_rows(data: &Dataset, rows: &[usize], device: &Device) -> Result<Self> {
        let inputs: Vec<&[f32]> = rows.iter().map(|&r| data.input(r)).collect();
        let every_step = data.is_every_step();
        if every_step
            && let Some(&r) = rows
                .iter()
                .find(|&&r| data.steps(r) * data.outputs() != data.targets_per_row())
        {
            return Err(crate::Error::BadRow {
                row: r,
                problem: format!(
                    "has {} steps and {} targets; a target at every step needs {} per step",
                    data.steps(r),
                    data.targets_per_row(),
                    data.outputs()
                ),
            });
        }
        let packed = PackedBatch::new(&inputs, data.features(), device)?;
        let targets = packed
            .order()
            .iter()
            .flat_map(|&k| data.targets(rows[k]).iter().copied())
            .collect();
        Ok(Self {
            packed,
            targets,
            every_step,
        })
    }

    /// Packs bare input sequences (no targets), for prediction.
    pub fn from_inputs(inputs: &[&[f32]], input_size: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            packed: PackedBatch::new(inputs, input_size, device)?,
            targets: Vec::new(),
            every_step: false,
        })
    }

    /// The packed inputs.
    pub fn packed(&self) -> &PackedBatch {
        &self.packed
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.packed.len()
    }

    /// Always false: a batch holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        self.packed.is_empty()
    }
}

/// The result of a backward pass over one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct GradSum {
    /// The gradient of the **summed** loss, in flat-vector order; divide by the total sample count
    /// of the global batch to get the gradient of the mean loss.
    pub grads: Vec<f32>,
    /// Metric sums of the predictions made on the way.
    pub sums: BatchSums,
}

/// Dropout in one training step: the settings, the optimizer step (1-based) and each batch
/// sample's dataset row, in the batch's input order (the masks' keys).
#[derive(Debug, Clone, Copy)]
pub struct StepDropout<'a> {
    /// Probability and seed.
    pub dropout: Dropout,
    /// The optimizer step being computed.
    pub step: u64,
    /// Each sample's dataset row, as the batch's rows were given.
    pub rows: &'a [u64],
}

/// Forward and backward over `batch`: the gradient of the loss summed over the batch, each
/// sample's loss the mean over its outputs (`sum_i mean_j l(y_ij, t_ij)`; with targets at every
/// step, the mean over its steps and outputs). `targets` maps each
/// target back to the data's units for the metrics. With `dropout` (and a head with hidden
/// layers), units of the head are dropped as [`Dropout::masks`] draws them.
pub fn grad_sum(
    model: &SeqModel,
    batch: &Batch,
    targets: &[Affine],
    loss: Loss,
    dropout: Option<StepDropout<'_>>,
) -> Result<GradSum> {
    let widths = model.head_widths();
    let out = match dropout {
        Some(d) if d.dropout.p > 0.0 && !widths.is_empty() => {
            if d.rows.len() != batch.len() {
                return Err(crate::Error::setting(
                    "dropout",
                    format!("{} row keys for a batch of {}", d.rows.len(), batch.len()),
                ));
            }
            let keys = mask_keys(batch, d.rows)?;
            let device = batch.packed.data().device();
            let masks = d
                .dropout
                .masks(d.step, &keys, &widths)
                .into_iter()
                .zip(&widths)
                .map(|(m, &w)| Tensor::from_vec(m, (keys.len(), w), device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            model.forward_train(&batch.packed, &masks, batch.every_step)?
        }
        _ => model.forward_train(&batch.packed, &[], batch.every_step)?,
    };
    let grads = summed_loss(&out.ys, batch, loss)?.backward()?;
    let preds = out.ys.flatten_all()?.to_vec1::<f32>()?;
    Ok(GradSum {
        grads: model.params().grads_flat(&grads)?,
        sums: loss.sums(&batch.targets, &preds, targets),
    })
}

/// `sum_i mean_j l(y_ij, t_ij)` over the batch's outputs `ys` (sorted order) in candle's graph;
/// with targets at every step, each sample's mean runs over its steps too.
fn summed_loss(ys: &Tensor, batch: &Batch, loss: Loss) -> Result<Tensor> {
    let wanted = Tensor::from_slice(&batch.targets, ys.shape(), ys.device())?;
    let mut total = match loss {
        Loss::Mse => crate::fused::squared_error(ys, &wanted)?,
        Loss::Bce => binary_cross_entropy(ys, &wanted)?,
    };
    if batch.every_step {
        // Each sample's loss is the mean over its steps too (every row has the same steps).
        let steps = batch.targets.len() / batch.len() / ys.dim(1)?;
        total = (total / steps as f64)?;
    }
    Ok(total)
}

/// [`grad_sum`] from a carried recurrent state: truncated backpropagation through time. Each
/// sequence of `batch` starts from its state in `init` (input order,
/// [`crate::model::ModelConfig::state_len`] values each; zeros without), a constant for the
/// gradient, as PyTorch's `h = h.detach()` between chunks. Returns the gradient and metric sums,
/// and each sequence's state after its last step (input order), which starts its next chunk.
/// Runs the per-step model ([`ReferenceModel::forward_from`]); no dropout.
pub fn stateful_grad_sum(
    model: &ReferenceModel,
    batch: &Batch,
    targets: &[Affine],
    loss: Loss,
    init: Option<&[f32]>,
) -> Result<(GradSum, Vec<f32>)> {
    let out = model.forward_from(&batch.packed, init, batch.every_step)?;
    let grads = summed_loss(&out.ys, batch, loss)?.backward()?;
    let preds = out.ys.flatten_all()?.to_vec1::<f32>()?;
    let sums = GradSum {
        grads: model.params().grads_flat(&grads)?,
        sums: loss.sums(&batch.targets, &preds, targets),
    };
    Ok((sums, out.state))
}

/// Forward only from a carried state ([`stateful_grad_sum`]'s forward): the metric sums of
/// `batch` and each sequence's state after its last step.
pub fn stateful_evaluate(
    model: &ReferenceModel,
    batch: &Batch,
    targets: &[Affine],
    loss: Loss,
    init: Option<&[f32]>,
) -> Result<(BatchSums, Vec<f32>)> {
    let out = model.forward_from(&batch.packed, init, batch.every_step)?;
    let preds = out.ys.flatten_all()?.to_vec1::<f32>()?;
    Ok((loss.sums(&batch.targets, &preds, targets), out.state))
}

/// Forward only over `rows` of `data` as one stream: each row (a window) starts from the state
/// the row before it ended with, the first from zeros. Each row's metric sums, in `rows` order.
pub fn stream_sums(
    model: &ReferenceModel,
    data: &Dataset,
    rows: &[usize],
    targets: &[Affine],
    loss: Loss,
    device: &Device,
) -> Result<Vec<BatchSums>> {
    let mut state: Option<Vec<f32>> = None;
    let mut out = Vec::with_capacity(rows.len());
    for &row in rows {
        let batch = Batch::from_rows(data, &[row], device)?;
        let (sums, end) = stateful_evaluate(model, &batch, targets, loss, state.as_deref())?;
        out.push(sums);
        state = Some(end);
    }
    Ok(out)
}

/// The keys of the head's rows, in the order the head runs them: each sequence's dataset row
/// (sorted order), or with targets at every step, `row << 24 | step` for each of its steps.
fn mask_keys(batch: &Batch, rows: &[u64]) -> Result<Vec<u64>> {
    let order = batch.packed.order();
    if !batch.every_step {
        return Ok(order.iter().map(|&k| rows[k]).collect());
    }
    let lengths = batch.packed.sorted_lengths();
    if lengths.first().is_some_and(|&l| l >= 1 << 24) {
        return Err(crate::Error::setting(
            "dropout",
            "with a target at every step, sequences are limited to 2^24 steps",
        ));
    }
    Ok(order
        .iter()
        .zip(&lengths)
        .flat_map(|(&k, &len)| (0..len as u64).map(move |t| (rows[k] << 24) | t))
        .collect())
}

/// `sum_ij bce(x_ij, t_ij) / outputs` in candle's graph, in the stable form
/// `max(x, 0) - x t + log(1 + exp(-|x|))`; its gradient is `(sigmoid(x) - t) / outputs`.
fn binary_cross_entropy(xs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let outputs = xs.dim(1)? as f64;
    let softplus = (xs.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let per = ((xs.relu()? - (xs * targets)?)? + softplus)?;
    Ok((per.sum_all()? / outputs)?)
}

/// Forward only: the metric sums of `batch`.
pub fn evaluate(
    model: &SeqModel,
    batch: &Batch,
    targets: &[Affine],
    loss: Loss,
) -> Result<BatchSums> {
    let preds = predict_sorted(model, batch)?;
    Ok(loss.sums(&batch.targets, &preds, targets))
}

/// Forward only: the outputs that meet each sequence's targets, in **input** order (with
/// targets at every step, `steps × output_size` values per sequence, step by step).
pub fn predict_targets(model: &SeqModel, batch: &Batch) -> Result<Vec<f32>> {
    if !batch.every_step {
        return predict(model, batch);
    }
    let sorted = predict_sorted(model, batch)?;
    let outputs = model.config().output_size;
    let order = batch.packed.order();
    let lengths = batch.packed.sorted_lengths();
    let mut chunks: Vec<&[f32]> = vec![&[]; order.len()];
    let mut at = 0;
    for (&k, &len) in order.iter().zip(&lengths) {
        chunks[k] = &sorted[at..at + len * outputs];
        at += len * outputs;
    }
    Ok(chunks.concat())
}

/// Forward only: the head's outputs in **input** order, `output_size` values per sequence.
pub fn predict(model: &SeqModel, batch: &Batch) -> Result<Vec<f32>> {
    let ys = model.infer(&batch.packed)?;
    Ok(batch.packed.unsort(&ys)?.flatten_all()?.to_vec1::<f32>()?)
}

fn predict_sorted(model: &SeqModel, batch: &Batch) -> Result<Vec<f32>> {
    let ys = if batch.every_step {
        model.infer_every_step(&batch.packed)?
    } else {
        model.infer(&batch.packed)?
    };
    Ok(ys.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::{ModelConfig, ModelKind, Params};

    /// Asserts that every `stride`-th entry of `grads` is the central finite difference (step
    /// 0.01) of `loss_at` around `flat`, within `tol` of the larger of the gradient and 0.1.
    fn assert_finite_differences(
        flat: &[f32],
        grads: &[f32],
        stride: usize,
        tol: f64,
        loss_at: impl Fn(&[f32]) -> f64,
        what: &str,
    ) {
        let h = 1e-2f32;
        for k in (0..flat.len()).step_by(stride) {
            let (mut up, mut down) = (flat.to_vec(), flat.to_vec());
            up[k] += h;
            down[k] -= h;
            let numeric = (loss_at(&up) - loss_at(&down)) / (2.0 * f64::from(h));
            let analytic = f64::from(grads[k]);
            assert!(
                (numeric - analytic).abs() < tol * analytic.abs().max(0.1),
                "{what}: parameter {k}: finite difference {numeric} vs gradient {analytic}"
            );
        }
    }

    /// With dropout, a batch's gradient is the sum of its halves' (each sample keeps its mask
    /// wherever it is computed), differs from the gradient without dropout, and a repeated step
    /// gives the same values.
    #[test]
    fn dropout_masks_follow_the_sample_not_the_batch() {
        let config = ModelConfig {
            kind: ModelKind::Lstm,
            input_size: 1,
            hidden_size: 4,
            num_layers: 1,
            bidirectional: false,
            output_size: 1,
            head: crate::model::HeadLayers::new(&[6, 5]).unwrap(),
        };
        // Rows of 2-5 steps with one target, and rows of 4 steps with a target at each step (a
        // mask per step of each row).
        for every_step in [false, true] {
            let mut data = if every_step {
                Dataset::every_step(1, 4, 1)
            } else {
                Dataset::with_shape(1, 1)
            };
            for r in 0..9 {
                let len = if every_step { 8 } else { 3 + r % 4 };
                let row: Vec<f32> = (0..len).map(|k| (r * 7 + k) as f32 / 20.0).collect();
                data.push_row(&row);
            }
            dropout_halves_add_up(config, &data);
        }
    }

    fn dropout_halves_add_up(config: ModelConfig, data: &Dataset) {
        let model = SeqModel::new(Params::init(config, 5, &Device::Cpu).unwrap());
        let maps = [Affine::divide(1.0)];
        let dropout = Dropout { p: 0.4, seed: 11 };
        let run = |rows: &[usize], p: Option<Dropout>| {
            let keys: Vec<u64> = rows.iter().map(|&r| r as u64 + 100).collect();
            let batch = Batch::from_rows(data, rows, &Device::Cpu).unwrap();
            let d = p.map(|dropout| StepDropout {
                dropout,
                step: 3,
                rows: &keys,
            });
            grad_sum(&model, &batch, &maps, Loss::Mse, d).unwrap()
        };
        let whole = run(&[0, 1, 2, 3, 4, 5, 6, 7, 8], Some(dropout));
        let (a, b) = (
            run(&[5, 0, 8, 2], Some(dropout)),
            run(&[7, 1, 3, 6, 4], Some(dropout)),
        );
        // Sums in another order: agreement to f32 rounding of the largest entry.
        let largest = whole.grads.iter().fold(0f32, |m, g| m.max(g.abs()));
        for (k, w) in whole.grads.iter().enumerate() {
            let parts = a.grads[k] + b.grads[k];
            assert!((w - parts).abs() <= 1e-5 * largest, "{k}: {w} vs {parts}");
        }
        assert_eq!(whole, run(&[0, 1, 2, 3, 4, 5, 6, 7, 8], Some(dropout)));
        let plain = run(&[0, 1, 2, 3, 4, 5, 6, 7, 8], None);
        assert_ne!(whole.grads, plain.grads);
        let off = Dropout { p: 0.0, seed: 11 };
        assert_eq!(plain, run(&[0, 1, 2, 3, 4, 5, 6, 7, 8], Some(off)));
    }

    /// With a target at every step, the gradient is that of each sample's mean over its steps
    /// and outputs (a central finite difference of the evaluated loss), for MSE and BCE.
    #[test]
    fn every_step_gradients_match_finite_differences() {
        let config = ModelConfig {
            kind: ModelKind::Lstm,
            input_size: 2,
            hidden_size: 3,
            num_layers: 1,
            bidirectional: false,
            output_size: 2,
            // No ReLU head: a finite difference across its kink is no derivative.
            head: crate::model::HeadLayers::default(),
        };
        for loss in [Loss::Mse, Loss::Bce] {
            let mut data = Dataset::every_step(2, 3, 2);
            for r in 0..4 {
                let mut row: Vec<f32> = (0..6)
                    .map(|k| ((r * 5 + k) % 7) as f32 / 4.0 - 0.7)
                    .collect();
                row.extend((0..6).map(|k| match loss {
                    Loss::Mse => ((r + k) % 5) as f32 / 3.0 - 0.5,
                    Loss::Bce => ((r + k) % 2) as f32,
                }));
                data.push_row(&row);
            }
            let batch = Batch::from_rows(&data, &[0, 1, 2, 3], &Device::Cpu).unwrap();
            let maps = [Affine::divide(1.0); 2];
            let params = Params::init(config, 9, &Device::Cpu).unwrap();
            let flat = params.to_flat().unwrap();
            let g = grad_sum(&SeqModel::new(params), &batch, &maps, loss, None).unwrap();
            assert_eq!(g.sums.samples, 4 * 3 * 2);
            let loss_at = |flat: &[f32]| {
                let model = SeqModel::new(Params::from_flat(config, flat, &Device::Cpu).unwrap());
                let sums = evaluate(&model, &batch, &maps, loss).unwrap();
                // Summed per-value losses; per sample, the mean over 3 steps × 2 outputs.
                sums.squared_error / 6.0
            };
            assert_finite_differences(&flat, &g.grads, 3, 3e-3, loss_at, loss.as_str());
            // Predictions meet the targets: steps × outputs per row, in input order.
            let model = SeqModel::new(Params::from_flat(config, &flat, &Device::Cpu).unwrap());
            let all = predict_targets(&model, &batch).unwrap();
            assert_eq!(all.len(), 4 * 6);
            let one = Batch::from_rows(&data, &[2], &Device::Cpu).unwrap();
            let alone = predict_targets(&model, &one).unwrap();
            for (a, b) in alone.iter().zip(&all[12..18]) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
            // The last step's outputs are what Predict answers for the same history.
            let last = predict(
                &model,
                &Batch::from_inputs(&[data.input(2)], 2, &Device::Cpu).unwrap(),
            )
            .unwrap();
            for (a, b) in last.iter().zip(&alone[4..6]) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }

    /// Chunks run one after another with the state carried give the outputs of one pass over
    /// the whole sequence (fused model, every step), for every cell kind and two layers, with
    /// streams of different chunks side by side in a batch. The state is what starts the next
    /// chunk: starting from zeros instead gives other outputs.
    #[test]
    fn carried_states_continue_the_sequence_exactly() {
        for kind in [ModelKind::RnnTanh, ModelKind::Lstm, ModelKind::Gru] {
            let config = ModelConfig {
                kind,
                input_size: 2,
                hidden_size: 4,
                num_layers: 2,
                bidirectional: false,
                output_size: 1,
                // A linear head: a ReLU unit that never fires would hide the state.
                head: crate::model::HeadLayers::default(),
            };
            let params = Params::init(config, 5, &Device::Cpu).unwrap();
            let (window, chunks, streams) = (3, 4, 2);
            let series =
                |k: usize, t: usize, f: usize| ((k * 31 + t * 7 + f * 3) % 11) as f32 / 5.0 - 1.0;
            // Stream k, chunk j is row k * chunks + j; one target per step (unused here).
            let mut data = Dataset::every_step(2, window, 1);
            for k in 0..streams {
                for j in 0..chunks {
                    let mut row: Vec<f32> = (j * window..(j + 1) * window)
                        .flat_map(|t| [series(k, t, 0), series(k, t, 1)])
                        .collect();
                    row.extend(std::iter::repeat_n(0.5, window));
                    data.push_row(&row);
                }
            }
            let reference = ReferenceModel::new(params.clone());
            let maps = [Affine::divide(1.0)];
            let rows: Vec<usize> = (0..data.len()).collect();
            let mut state: Option<Vec<f32>> = None;
            let mut carried = vec![Vec::new(); streams];
            let mut cold = Vec::new();
            for (j, rows) in crate::data::stream_batches(&rows, streams)
                .iter()
                .enumerate()
            {
                let batch = Batch::from_rows(&data, rows, &Device::Cpu).unwrap();
                let out = reference
                    .forward_from(batch.packed(), state.as_deref(), true)
                    .unwrap();
                let ys = out.ys.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (k, part) in ys.chunks(window).enumerate() {
                    carried[k].extend_from_slice(part);
                }
                if j == 1 {
                    let (sums, _) =
                        stateful_evaluate(&reference, &batch, &maps, Loss::Mse, None).unwrap();
                    cold.push(sums.squared_error);
                    let (sums, _) =
                        stateful_evaluate(&reference, &batch, &maps, Loss::Mse, state.as_deref())
                            .unwrap();
                    cold.push(sums.squared_error);
                }
                state = Some(out.state);
            }
            assert_ne!(
                cold[0], cold[1],
                "{kind:?}: the carried state changed nothing"
            );
            let model = SeqModel::new(params.clone());
            for (k, got) in carried.iter().enumerate() {
                let whole: Vec<f32> = (0..window * chunks)
                    .flat_map(|t| [series(k, t, 0), series(k, t, 1)])
                    .collect();
                let batch = Batch::from_inputs(&[&whole], 2, &Device::Cpu).unwrap();
                let expected = model
                    .infer_every_step(batch.packed())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(got.len(), expected.len());
                for (t, (a, b)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{kind:?} stream {k} step {t}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Sequences of different lengths in one batch, each from its own state: the batch's final
    /// states and last outputs equal each sequence's run alone (the sorted order is undone).
    #[test]
    fn carried_states_follow_their_sequences_through_the_sorted_order() {
        for kind in [ModelKind::Lstm, ModelKind::Gru] {
            let config = ModelConfig {
                kind,
                hidden_size: 3,
                num_layers: 2,
                ..ModelConfig::tutorial()
            };
            let model = ReferenceModel::new(Params::init(config, 7, &Device::Cpu).unwrap());
            let per = config.state_len();
            // Lengths 2, 5, 3: sorted order 1, 2, 0.
            let seqs: [&[f32]; 3] = [&[0.1, -0.4], &[0.3, 0.2, -0.1, 0.5, 0.9], &[-0.7, 0.0, 0.6]];
            let init: Vec<f32> = (0..3 * per)
                .map(|k| (k * 13 % 17) as f32 / 8.0 - 1.0)
                .collect();
            let batch = Batch::from_inputs(&seqs, 1, &Device::Cpu).unwrap();
            assert_ne!(batch.packed().order(), &[0, 1, 2]);
            let together = model
                .forward_from(batch.packed(), Some(&init), false)
                .unwrap();
            let ys = batch
                .packed()
                .unsort(&together.ys)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, seq) in seqs.iter().enumerate() {
                let one = Batch::from_inputs(&[seq], 1, &Device::Cpu).unwrap();
                let alone = model
                    .forward_from(one.packed(), Some(&init[i * per..(i + 1) * per]), false)
                    .unwrap();
                let y = alone.ys.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    (y[0] - ys[i]).abs() < 1e-6,
                    "{kind:?} sequence {i}: {} vs {}",
                    y[0],
                    ys[i]
                );
                for (k, (a, b)) in alone
                    .state
                    .iter()
                    .zip(&together.state[i * per..(i + 1) * per])
                    .enumerate()
                {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{kind:?} sequence {i} state {k}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// A state of the wrong size and a bidirectional model are refused with the reason.
    #[test]
    fn carried_states_are_checked() {
        let config = ModelConfig {
            kind: ModelKind::Lstm,
            hidden_size: 4,
            num_layers: 2,
            ..ModelConfig::tutorial()
        };
        assert_eq!(config.state_len(), 16);
        let model = ReferenceModel::new(Params::init(config, 1, &Device::Cpu).unwrap());
        let batch = Batch::from_inputs(&[&[0.1, 0.2], &[0.3, 0.4]], 1, &Device::Cpu).unwrap();
        let err = model
            .forward_from(batch.packed(), Some(&[0.0; 31]), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("31 state values for 2 sequences of 16"),
            "{err}"
        );
        assert!(
            model
                .forward_from(batch.packed(), Some(&[0.0; 32]), false)
                .is_ok()
        );
        let bi = ModelConfig {
            bidirectional: true,
            ..config
        };
        let model = ReferenceModel::new(Params::init(bi, 1, &Device::Cpu).unwrap());
        let err = model
            .forward_from(batch.packed(), None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unidirectional"), "{err}");
    }

    /// The BCE gradient equals a central finite difference of the summed loss.
    #[test]
    fn the_bce_gradient_matches_finite_differences() {
        let config = ModelConfig {
            kind: ModelKind::Gru,
            input_size: 2,
            hidden_size: 3,
            num_layers: 1,
            bidirectional: false,
            output_size: 2,
            head: Default::default(),
        };
        let mut data = Dataset::with_shape(2, 2);
        data.push_row(&[0.5, -1.0, 0.25, 0.75, 1.0, 0.0]);
        data.push_row(&[-0.5, 0.3, 0.0, 1.0]);
        data.push_row(&[1.5, 0.2, -0.7, 0.1, 0.9, 0.4, 1.0, 1.0]);
        let batch = Batch::from_rows(&data, &[0, 1, 2], &Device::Cpu).unwrap();
        let maps = [Affine::divide(1.0); 2];
        let params = Params::init(config, 3, &Device::Cpu).unwrap();
        let flat = params.to_flat().unwrap();
        let g = grad_sum(&SeqModel::new(params), &batch, &maps, Loss::Bce, None).unwrap();
        assert!(g.sums.labelled && g.sums.samples == 6);
        let loss_at = |flat: &[f32]| {
            let model = SeqModel::new(Params::from_flat(config, flat, &Device::Cpu).unwrap());
            let sums = evaluate(&model, &batch, &maps, Loss::Bce).unwrap();
            // The summed BCE over all outputs, divided by 2 outputs per sample.
            sums.squared_error / 2.0
        };
        assert_finite_differences(&flat, &g.grads, 5, 2e-3, loss_at, "bce");
    }
}
