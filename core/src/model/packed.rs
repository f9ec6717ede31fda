//! A batch of variable-length sequences laid out as PyTorch's `PackedSequence`.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::fused::Steps;
use crate::{Error, Result};

/// Sequences sorted by length (longest first, ties in input order) and stored time-major, so
/// that step `t` is a contiguous block of the `batch_sizes[t]` sequences still running.
///
/// `data` is `(sum(batch_sizes), input_size)`. Nothing here is tracked for gradients.
#[derive(Debug, Clone)]
pub struct PackedBatch {
    data: Tensor,
    steps: Arc<Steps>,
    /// Packed row of each sorted sequence's last step.
    last_rows: Tensor,
    order: Vec<usize>,
    unsort: Tensor,
    input_size: usize,
}

impl PackedBatch {
    /// Packs `seqs`, where sequence `i` holds `steps_i * input_size` values, step by step.
    /// Every sequence needs at least one step.
    pub fn new(seqs: &[&[f32]], input_size: usize, device: &Device) -> Result<Self> {
        if seqs.is_empty() {
            return Err(Error::BadRow {
                row: 0,
                problem: "the batch has no sequences".into(),
            });
        }
        if input_size == 0 {
            return Err(Error::setting("input_size", "must be at least 1"));
        }
        let mut lengths = Vec::with_capacity(seqs.len());
        for (row, seq) in seqs.iter().enumerate() {
            if seq.is_empty() || seq.len() % input_size != 0 {
                return Err(Error::BadRow {
                    row,
                    problem: format!(
                        "has {} values; a sequence needs at least one step of {input_size}",
                        seq.len()
                    ),
                });
            }
            lengths.push(seq.len() / input_size);
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let max_len = lengths[order[0]];
        let mut batch_sizes = Vec::with_capacity(max_len);
        let total: usize = lengths.iter().sum();
        let mut data = Vec::with_capacity(total * input_size);
        for t in 0..max_len {
            let running = order.iter().take_while(|&&i| lengths[i] > t).count();
            for &i in &order[..running] {
                data.extend_from_slice(&seqs[i][t * input_size..(t + 1) * input_size]);
            }
            batch_sizes.push(running);
        }
        let steps = Steps::new(batch_sizes)?;
        let last_rows: Vec<u32> = order
            .iter()
            .enumerate()
            .map(|(k, &i)| (steps.offsets()[lengths[i] - 1] + k) as u32)
            .collect();
        let mut unsort = vec![0u32; order.len()];
        for (sorted_pos, &i) in order.iter().enumerate() {
            unsort[i] = sorted_pos as u32;
        }
        let b_sz = seqs.len();
        Ok(Self {
            data: Tensor::from_vec(data, (total, input_size), device)?,
            last_rows: Tensor::from_vec(last_rows, b_sz, device)?,
            steps: Arc::new(steps),
            unsort: Tensor::from_vec(unsort, b_sz, device)?,
            order,
            input_size,
        })
    }

    /// Packs a padded batch `xs` of shape `(b_sz, seq_len, input_size)` (row-major) where
    /// sequence `i` has `lengths[i]` real steps; what lies beyond them is never read.
    pub fn from_padded(
        xs: &[f32],
        (b_sz, seq_len, input_size): (usize, usize, usize),
        lengths: &[usize],
        device: &Device,
    ) -> Result<Self> {
        crate::model::check_len("padded batch", xs.len(), b_sz * seq_len * input_size)?;
        crate::model::check_len("lengths", lengths.len(), b_sz)?;
        let mut seqs = Vec::with_capacity(b_sz);
        for (row, &len) in lengths.iter().enumerate() {
            if len == 0 || len > seq_len {
                return Err(Error::BadRow {
                    row,
                    problem: format!("length {len} is not in 1..={seq_len}"),
                });
            }
            let start = row * seq_len * input_size;
            seqs.push(&xs[start..start + len * input_size]);
        }
        Self::new(&seqs, input_size, device)
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Always false: a batch holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Features per step.
    pub fn input_size(&self) -> usize {
        self.input_size
    }

    /// Sequences still running at each step.
    pub fn batch_sizes(&self) -> &[usize] {
        self.steps.batch_sizes()
    }

    /// The time structure the fused layers run on.
    pub fn steps(&self) -> &Arc<Steps> {
        &self.steps
    }

    /// Every packed row: `(sum(batch_sizes), input_size)`.
    pub fn data(&self) -> &Tensor {
        &self.data
    }

    /// Packed row of each sorted sequence's last step: `(b_sz,)`, u32.
    pub(crate) fn last_rows(&self) -> &Tensor {
        &self.last_rows
    }

    /// Steps of each sequence, in sorted order.
    pub fn sorted_lengths(&self) -> Vec<usize> {
        let sizes = self.batch_sizes();
        (0..self.len())
            .map(|k| sizes.iter().take_while(|&&b| b > k).count())
            .collect()
    }

    /// The packed row of every step of every sequence, sequence by sequence in sorted order
    /// (`(sum(lengths),)`, u32): gathers per-step values into per-sequence order.
    pub fn step_rows(&self) -> Result<Tensor> {
        let offsets = self.steps.offsets();
        let rows: Vec<u32> = self
            .sorted_lengths()
            .iter()
            .enumerate()
            .flat_map(|(k, &len)| (0..len).map(move |t| (offsets[t] + k) as u32))
            .collect();
        let n = rows.len();
        Ok(Tensor::from_vec(rows, n, self.data.device())?)
    }

    /// `order[k]` is the input index of the `k`-th sequence in sorted order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Step `t` of the running sequences: `(batch_sizes[t], input_size)`.
    pub(crate) fn step(&self, t: usize) -> Result<Tensor> {
        Ok(self
            .data
            .narrow(0, self.steps.offsets()[t], self.batch_sizes()[t])?)
    }

    /// Reorders a tensor whose first dimension is in sorted order back to input order.
    pub fn unsort(&self, sorted: &Tensor) -> Result<Tensor> {
        Ok(sorted.index_select(&self.unsort, 0)?)
    }

    /// Reorders per-sequence host values (in input order) into sorted order.
    pub fn sort_values<T: Copy>(&self, values: &[T], per_seq: usize) -> Vec<T> {
        self.order
            .iter()
            .flat_map(|&i| values[i * per_seq..(i + 1) * per_seq].iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_like_pytorch() {
        let a = [1.0, 2.0, 3.0];
        let b = [10.0, 20.0, 30.0, 40.0, 50.0];
        let c = [100.0];
        let p = PackedBatch::new(&[&a, &b, &c], 1, &Device::Cpu).unwrap();
        assert_eq!(p.order(), [1, 0, 2]);
        assert_eq!(p.batch_sizes(), [3, 2, 2, 1, 1]);
        let step1 = p.step(1).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(step1, [[20.0], [2.0]]);
        assert_eq!(p.last_rows().to_vec1::<u32>().unwrap(), [8, 6, 2]);
        assert_eq!(p.sort_values(&[7, 8, 9], 1), [8, 7, 9]);
        assert!(PackedBatch::new(&[&a, &[]], 1, &Device::Cpu).is_err());
    }
}
