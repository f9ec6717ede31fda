//! The recurrent network with its linear head, run over a [`PackedBatch`] with one fused op per
//! layer and direction ([`crate::fused`]).

use candle_core::Tensor;

use super::{ModelConfig, PackedBatch, Params};
use crate::fused::{self, HeadSpec, LayerParams, LayerSpec};
use crate::{Error, Result};

/// What a forward pass returns. Every tensor is in **sorted** order (see
/// [`PackedBatch::order`]); use [`PackedBatch::unsort`] to get input order.
#[derive(Debug)]
pub struct Forward {
    /// The head's output: `(b_sz, output_size)`, or `(sum(lengths), output_size)` with outputs
    /// at every step (see [`SeqModel::forward_train`]).
    pub ys: Tensor,
    /// Last hidden state of every layer and direction, in PyTorch's `h_n` order (`l0`,
    /// `l0_reverse`, `l1`, ...): each `(b_sz, hidden)`.
    pub h_n: Vec<Tensor>,
    /// The LSTM cell states in the same order (outside candle's graph); empty for the other
    /// kinds and for inference.
    pub c_n: Vec<Tensor>,
    /// The top layer's output at every step, when asked for: `outputs[t]` is
    /// `(batch_sizes[t], directions * hidden)`.
    pub outputs: Vec<Tensor>,
}

/// A recurrent model over its parameters. Cheap to build; the parameters are shared.
#[derive(Debug, Clone)]
pub struct SeqModel {
    params: Params,
    /// Every layer-direction, in `h_n` order.
    layers: Vec<LayerSpec>,
    /// The head's linear layers, input side first (a ReLU between each two).
    head: Vec<HeadSpec>,
}

impl SeqModel {
    /// Wraps parameters as a model.
    pub fn new(params: Params) -> Self {
        let config = *params.config();
        let layout = params.layout();
        // A name the layout lacks cannot happen for a validated config; if it did, the offset
        // is out of range and the first forward pass says so.
        let offset = |name: String| layout.get(&name).map_or(usize::MAX, |e| e.offset);
        let mut layers = Vec::with_capacity(config.num_layers * config.directions());
        for layer in 0..config.num_layers {
            for (d, suffix) in ["", "_reverse"]
                .iter()
                .take(config.directions())
                .enumerate()
            {
                layers.push(LayerSpec {
                    kind: config.kind,
                    input: if layer == 0 {
                        config.input_size
                    } else {
                        config.head_input()
                    },
                    hidden: config.hidden_size,
                    reverse: d == 1,
                    params: LayerParams {
                        w_ih: offset(format!("rnn.weight_ih_l{layer}{suffix}")),
                        w_hh: offset(format!("rnn.weight_hh_l{layer}{suffix}")),
                        b_ih: offset(format!("rnn.bias_ih_l{layer}{suffix}")),
                        b_hh: offset(format!("rnn.bias_hh_l{layer}{suffix}")),
                    },
                    param_len: layout.total(),
                });
            }
        }
        Self {
            head: config
                .head_layers()
                .into_iter()
                .map(|l| HeadSpec {
                    input: l.input,
                    output: l.output,
                    weight: offset(l.weight),
                    bias: offset(l.bias),
                    param_len: layout.total(),
                })
                .collect(),
            params,
            layers,
        }
    }

    /// The parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        self.params.config()
    }

    /// Runs the batch and the head as part of candle's graph, keeping what a backward pass
    /// needs. With `keep_outputs`, also returns the top layer's per-step output.
    pub fn forward(&self, batch: &PackedBatch, keep_outputs: bool) -> Result<Forward> {
        self.run(batch, true, keep_outputs, &[], false)
    }

    /// The training pass: [`SeqModel::forward`] with dropout after the head's hidden layers
    /// (`masks[i]` multiplies hidden layer `i`'s output, one row per head row; empty for none),
    /// and with `every_step` the head run on the top layer's output at every step of every
    /// sequence: `ys` is then `(sum(lengths), output_size)`, sequence by sequence in sorted order
    /// (see [`PackedBatch::step_rows`]).
    pub fn forward_train(
        &self,
        batch: &PackedBatch,
        masks: &[Tensor],
        every_step: bool,
    ) -> Result<Forward> {
        if !masks.is_empty() && masks.len() != self.head.len() - 1 {
            return Err(Error::setting(
                "dropout",
                format!(
                    "{} masks for a head of {} hidden layers",
                    masks.len(),
                    self.head.len() - 1
                ),
            ));
        }
        self.run(batch, true, false, masks, every_step)
    }

    /// The forward-only path with the head at every step: `(sum(lengths), output_size)`,
    /// sequence by sequence in sorted order.
    pub fn infer_every_step(&self, batch: &PackedBatch) -> Result<Tensor> {
        Ok(self.run(batch, false, false, &[], true)?.ys)
    }

    /// Widths of the head's hidden layers.
    pub fn head_widths(&self) -> Vec<usize> {
        self.head[1..].iter().map(|h| h.input).collect()
    }

    /// The forward-only path for prediction and evaluation: no graph, no saved activations.
    /// Returns the head's output `(b_sz, output_size)` in sorted order.
    pub fn infer(&self, batch: &PackedBatch) -> Result<Tensor> {
        Ok(self.run(batch, false, false, &[], false)?.ys)
    }

    fn run(
        &self,
        batch: &PackedBatch,
        train: bool,
        keep_outputs: bool,
        masks: &[Tensor],
        every_step: bool,
    ) -> Result<Forward> {
        let config = *self.config();
        if batch.input_size() != config.input_size {
            return Err(Error::BadRow {
                row: 0,
                problem: format!(
                    "steps have {} features, the model takes {}",
                    batch.input_size(),
                    config.input_size
                ),
            });
        }
        let flat = if train {
            self.params.flat().as_tensor().clone()
        } else {
            self.params.flat().as_tensor().detach()
        };
        let steps = batch.steps();
        let b_sz = steps.sequences();
        let dirs = config.directions();
        let mut x = batch.data().clone();
        let mut h_n = Vec::with_capacity(self.layers.len());
        let mut c_n = Vec::new();
        let layers = self.layers.chunks(dirs).len();
        for (index, layer) in self.layers.chunks(dirs).enumerate() {
            // Inference returns only the head's output: lower layers' final states are not
            // gathered there.
            let wanted = train || index + 1 == layers;
            let mut outputs = Vec::with_capacity(dirs);
            for spec in layer {
                let out = fused::layer(&x, &flat, spec, steps, train)?;
                // Backward directions end at step 0, forward ones at each sequence's last step.
                let last = |m: &Tensor| -> Result<Tensor> {
                    Ok(if spec.reverse {
                        m.narrow(0, 0, b_sz)?
                    } else {
                        m.index_select(batch.last_rows(), 0)?
                    })
                };
                if wanted {
                    if let Some(c) = &out.c {
                        c_n.push(last(c)?);
                    }
                    h_n.push(last(&out.h)?);
                }
                outputs.push(out.h);
            }
            x = if outputs.len() == 1 {
                outputs.swap_remove(0)
            } else {
                Tensor::cat(&outputs, 1)?
            };
        }
        let top_states = &h_n[h_n.len() - dirs..];
        let top = if dirs == 1 {
            top_states[0].clone()
        } else {
            Tensor::cat(top_states, 1)?
        };
        let mut ys = if every_step {
            x.index_select(&batch.step_rows()?, 0)?
        } else {
            top
        };
        for (i, spec) in self.head.iter().enumerate() {
            ys = fused::head(&ys, &flat, spec, train)?;
            if i + 1 < self.head.len() {
                ys = ys.relu()?;
                if let Some(mask) = masks.get(i) {
                    ys = (ys * mask)?;
                }
            }
        }
        let outputs = if keep_outputs {
            steps
                .offsets()
                .iter()
                .zip(steps.batch_sizes())
                .map(|(&at, &rows)| x.narrow(0, at, rows))
                .collect::<candle_core::Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Forward {
            ys,
            h_n,
            c_n,
            outputs,
        })
    }
}
