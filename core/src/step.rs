//! One training or evaluation pass over a batch of dataset rows: the piece every trainer (the
//! single-process one here, the cluster's workers) runs.

use candle_core::{Device, Tensor};

use crate::Result;
use crate::data::{Affine, Dataset};
use crate::metrics::BatchSums;
use crate::model::{PackedBatch, SeqModel};

/// Rows of a (normalised) dataset, packed for the model, with their targets in sorted order.
#[derive(Debug, Clone)]
pub struct Batch {
    packed: PackedBatch,
    targets: Vec<f32>,
}

impl Batch {
    /// Packs `rows` of `data`: each row's input steps (`data.features()` values each), and its
    /// targets in the packed (sorted) order.
    pub fn from_rows(data: &Dataset, rows: &[usize], device: &Device) -> Result<Self> {
        let inputs: Vec<&[f32]> = rows.iter().map(|&r| data.input(r)).collect();
        let packed = PackedBatch::new(&inputs, data.features(), device)?;
        let targets = packed
            .order()
            .iter()
            .flat_map(|&k| data.targets(rows[k]).iter().copied())
            .collect();
        Ok(Self { packed, targets })
    }

    /// Packs bare input sequences (no targets), for prediction.
    pub fn from_inputs(inputs: &[&[f32]], input_size: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            packed: PackedBatch::new(inputs, input_size, device)?,
            targets: Vec::new(),
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

/// Forward and backward over `batch`: the gradient of `sum_i mean_j (y_ij - t_ij)^2`.
/// `targets` maps each target back to the data's units for the metrics.
pub fn grad_sum(model: &SeqModel, batch: &Batch, targets: &[Affine]) -> Result<GradSum> {
    let out = model.forward(&batch.packed, false)?;
    let wanted = Tensor::from_slice(&batch.targets, out.ys.shape(), out.ys.device())?;
    let grads = crate::fused::squared_error(&out.ys, &wanted)?.backward()?;
    let preds = out.ys.flatten_all()?.to_vec1::<f32>()?;
    Ok(GradSum {
        grads: model.params().grads_flat(&grads)?,
        sums: BatchSums::of(&batch.targets, &preds, targets),
    })
}

/// Forward only: the metric sums of `batch`.
pub fn evaluate(model: &SeqModel, batch: &Batch, targets: &[Affine]) -> Result<BatchSums> {
    let preds = predict_sorted(model, &batch.packed)?;
    Ok(BatchSums::of(&batch.targets, &preds, targets))
}

/// Forward only: the head's outputs in **input** order, `output_size` values per sequence.
pub fn predict(model: &SeqModel, batch: &Batch) -> Result<Vec<f32>> {
    let ys = model.infer(&batch.packed)?;
    Ok(batch.packed.unsort(&ys)?.flatten_all()?.to_vec1::<f32>()?)
}

fn predict_sorted(model: &SeqModel, packed: &PackedBatch) -> Result<Vec<f32>> {
    Ok(model.infer(packed)?.flatten_all()?.to_vec1::<f32>()?)
}
