//! The reference implementation: the recurrent network written step by step in plain candle
//! ops, with candle's autograd doing the backward pass. It is the readable statement of the
//! math and the oracle the fused layers ([`crate::fused`]) are tested against.
//!
//! It also trains from a carried recurrent state ([`ReferenceModel::forward_from`]): truncated
//! backpropagation through time over one long series, where each chunk starts from the state the
//! previous chunk ended with, a constant for the gradient. The fused layers start from zeros.
//!
//! Each step of each direction is one matmul: the step input, a ones column and the previous
//! hidden state are concatenated, and the cell's input weights, folded biases and hidden weights
//! are concatenated once per forward pass to match. The batch is sorted by length and narrowed as
//! sequences end, like PyTorch's packed sequences, so padding never enters the computation.
//!
//! Its cell step also serves stateful streaming prediction ([`Streamer`]): one sequence fed a
//! few steps at a time, the recurrent state kept between calls, where a whole-sequence pass per
//! new step would redo the history each time.

use candle_core::{D, Tensor};

use super::{Forward, ModelConfig, ModelKind, PackedBatch, Params};
use crate::Result;

/// Recurrent state of one direction while it runs.
#[derive(Debug, Clone)]
struct State {
    h: Tensor,
    c: Option<Tensor>,
}

/// One layer-direction's weights, prepared for the fused step.
#[derive(Debug, Clone)]
struct CellWeights {
    /// `(layer_in + 1 + hidden, gates)`: rows match the step input `[x, 1, h]`. The gate columns
    /// are (i, f, o, g) for LSTM and (r, z, n_input, n_hidden) for GRU.
    w: Tensor,
}

/// The per-step model over shared parameters.
#[derive(Debug, Clone)]
pub struct ReferenceModel {
    params: Params,
}

impl ReferenceModel {
    /// Wraps parameters as a model.
    pub fn new(params: Params) -> Self {
        Self { params }
    }

    /// The parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        self.params.config()
    }

    /// Runs the batch and the head, step by step. With `keep_outputs`, also returns the top
    /// layer's per-step output (`outputs[t]` is `(batch_sizes[t], directions * hidden)`).
    pub fn forward(&self, batch: &PackedBatch, keep_outputs: bool) -> Result<Forward> {
        let config = *self.config();
        check_input(&config, batch)?;
        let mut h_n = Vec::new();
        let mut c_n = Vec::new();
        let mut below: Vec<Tensor> = Vec::new();
        let mut last = Vec::new();
        for layer in 0..config.num_layers {
            let fwd_w = self.cell_weights(layer, "")?;
            let (fwd_out, fwd_state) = run_forward(&config, batch, &below, &fwd_w, None)?;
            h_n.push(fwd_state.h.clone());
            c_n.extend(fwd_state.c.clone());
            last = vec![fwd_state.h];
            let outputs = if config.bidirectional {
                let bwd_w = self.cell_weights(layer, "_reverse")?;
                let (bwd_out, bwd_state) = run_backward(&config, batch, &below, &bwd_w)?;
                h_n.push(bwd_state.h.clone());
                c_n.extend(bwd_state.c.clone());
                last.push(bwd_state.h);
                fwd_out
                    .iter()
                    .zip(&bwd_out)
                    .map(|(f, b)| Tensor::cat(&[f, b], 1))
                    .collect::<candle_core::Result<Vec<_>>>()?
            } else {
                fwd_out
            };
            below = outputs;
        }
        let top = if last.len() == 1 {
            last.swap_remove(0)
        } else {
            Tensor::cat(&last, 1)?
        };
        let ys = apply_head(&top, &head_weights(&self.params)?)?;
        Ok(Forward {
            ys,
            h_n,
            c_n,
            outputs: if keep_outputs { below } else { Vec::new() },
        })
    }

    /// Runs a unidirectional model over `batch` from each sequence's recurrent state `init`
    /// (input order, [`ModelConfig::state_len`] values each; zeros without), then the head at
    /// every real step (`every_step`, sequence by sequence in sorted order, as
    /// [`super::SeqModel::forward_train`]) or after the last. The initial state is a constant:
    /// no gradient flows through it, which is PyTorch's `h = h.detach()` between chunks.
    pub fn forward_from(
        &self,
        batch: &PackedBatch,
        init: Option<&[f32]>,
        every_step: bool,
    ) -> Result<StatefulForward> {
        let config = *self.config();
        check_input(&config, batch)?;
        if config.bidirectional {
            return Err(crate::Error::setting(
                "stateful",
                "a bidirectional model reads each sequence from its end; a state carried from \
                 one chunk to the next needs a unidirectional model",
            ));
        }
        let (rows, hidden, per) = (batch.len(), config.hidden_size, config.state_len());
        let weights = (0..config.num_layers)
            .map(|l| self.cell_weights(l, ""))
            .collect::<Result<Vec<_>>>()?;
        let device = weights[0].w.device();
        let mut starts: Vec<Option<State>> = vec![None; config.num_layers];
        if let Some(init) = init {
            if init.len() != rows * per {
                return Err(crate::Error::setting(
                    "state",
                    format!(
                        "{} state values for {rows} sequences of {per} ({} layers × hidden {hidden}{})",
                        init.len(),
                        config.num_layers,
                        if config.kind == ModelKind::Lstm {
                            " × h, c"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            let sorted = Tensor::from_vec(batch.sort_values(init, per), (rows, per), device)?;
            let lstm = config.kind == ModelKind::Lstm;
            for (l, start) in starts.iter_mut().enumerate() {
                *start = Some(State {
                    h: sorted.narrow(1, l * hidden, hidden)?.contiguous()?,
                    c: lstm
                        .then(|| sorted.narrow(1, (config.num_layers + l) * hidden, hidden))
                        .transpose()?
                        .map(|c| c.contiguous())
                        .transpose()?,
                });
            }
        }
        let mut below: Vec<Tensor> = Vec::new();
        let mut ends = Vec::with_capacity(config.num_layers);
        for (w, start) in weights.iter().zip(starts) {
            let (out, end) = run_forward(&config, batch, &below, w, start)?;
            ends.push(end);
            below = out;
        }
        let top = if every_step {
            cat_rows(below)?.index_select(&batch.step_rows()?, 0)?
        } else {
            ends[config.num_layers - 1].h.clone()
        };
        let ys = apply_head(&top, &head_weights(&self.params)?)?;
        let mut columns: Vec<Tensor> = ends.iter().map(|s| s.h.detach()).collect();
        columns.extend(ends.iter().filter_map(|s| s.c.as_ref().map(Tensor::detach)));
        let state = batch
            .unsort(&Tensor::cat(&columns, 1)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(StatefulForward { ys, state })
    }

    /// Builds the fused weight of one layer and direction; see [`CellWeights::w`].
    fn cell_weights(&self, layer: usize, suffix: &str) -> Result<CellWeights> {
        let get = |name: &str| self.params.get(&format!("rnn.{name}_l{layer}{suffix}"));
        let (w_ih, w_hh, b_ih, b_hh) = (
            get("weight_ih")?,
            get("weight_hh")?,
            get("bias_ih")?,
            get("bias_hh")?,
        );
        let h = self.config().hidden_size;
        let w = match self.config().kind {
            ModelKind::RnnTanh | ModelKind::RnnRelu => {
                let b = (b_ih + b_hh)?.unsqueeze(1)?;
                Tensor::cat(&[&w_ih, &b, &w_hh], 1)?
            }
            ModelKind::Lstm => {
                let b = (b_ih + b_hh)?.unsqueeze(1)?;
                let w = Tensor::cat(&[&w_ih, &b, &w_hh], 1)?;
                // PyTorch's rows are (i, f, g, o); the sigmoid gates go first here.
                Tensor::cat(
                    &[
                        w.narrow(0, 0, 2 * h)?,
                        w.narrow(0, 3 * h, h)?,
                        w.narrow(0, 2 * h, h)?,
                    ],
                    0,
                )?
            }
            ModelKind::Gru => {
                let layer_in = w_ih.dim(1)?;
                let dev = w_ih.device();
                let rz = Tensor::cat(
                    &[
                        w_ih.narrow(0, 0, 2 * h)?,
                        (b_ih.narrow(0, 0, 2 * h)? + b_hh.narrow(0, 0, 2 * h)?)?.unsqueeze(1)?,
                        w_hh.narrow(0, 0, 2 * h)?,
                    ],
                    1,
                )?;
                let n_in = Tensor::cat(
                    &[
                        w_ih.narrow(0, 2 * h, h)?,
                        b_ih.narrow(0, 2 * h, h)?.unsqueeze(1)?,
                        Tensor::zeros((h, h), w_ih.dtype(), dev)?,
                    ],
                    1,
                )?;
                let n_hid = Tensor::cat(
                    &[
                        Tensor::zeros((h, layer_in), w_ih.dtype(), dev)?,
                        b_hh.narrow(0, 2 * h, h)?.unsqueeze(1)?,
                        w_hh.narrow(0, 2 * h, h)?,
                    ],
                    1,
                )?;
                Tensor::cat(&[rz, n_in, n_hid], 0)?
            }
        };
        Ok(CellWeights {
            w: w.t()?.contiguous()?,
        })
    }
}

/// What [`ReferenceModel::forward_from`] returns.
#[derive(Debug)]
pub struct StatefulForward {
    /// The head's output, sorted order: `(b_sz, output_size)`, or with targets at every step
    /// each sequence's steps in turn, `(sum(lengths), output_size)`.
    pub ys: Tensor,
    /// Each sequence's state after its last step, input order, [`ModelConfig::state_len`]
    /// values each (every layer's `h`, then every layer's `c`); outside candle's graph.
    pub state: Vec<f32>,
}

fn check_input(config: &ModelConfig, batch: &PackedBatch) -> Result<()> {
    if batch.input_size() != config.input_size {
        return Err(crate::Error::BadRow {
            row: 0,
            problem: format!(
                "steps have {} features, the model takes {}",
                batch.input_size(),
                config.input_size
            ),
        });
    }
    Ok(())
}

/// The input of step `t` with its ones column: the packed data for the first layer, the layer
/// below's output otherwise.
fn step_input(batch: &PackedBatch, below: &[Tensor], t: usize) -> Result<Vec<Tensor>> {
    let x = if below.is_empty() {
        batch.step(t)?
    } else {
        below[t].clone()
    };
    let ones = Tensor::ones((x.dim(0)?, 1), x.dtype(), x.device())?;
    Ok(vec![x, ones])
}

/// One cell step: `(rows, hidden)` state in, new state out.
fn cell(kind: ModelKind, mut xs: Vec<Tensor>, state: &State, w: &CellWeights) -> Result<State> {
    let hidden = state.h.dim(D::Minus1)?;
    xs.push(state.h.clone());
    let gates = Tensor::cat(&xs, 1)?.matmul(&w.w)?;
    Ok(match kind {
        ModelKind::RnnTanh => State {
            h: gates.tanh()?,
            c: None,
        },
        ModelKind::RnnRelu => State {
            h: gates.relu()?,
            c: None,
        },
        ModelKind::Lstm => {
            let c = state
                .c
                .as_ref()
                .ok_or_else(|| crate::Error::setting("state", "an LSTM step needs a cell state"))?;
            let ifo = candle_nn::ops::sigmoid(&gates.narrow(1, 0, 3 * hidden)?)?;
            let g = gates.narrow(1, 3 * hidden, hidden)?.tanh()?;
            let i = ifo.narrow(1, 0, hidden)?;
            let f = ifo.narrow(1, hidden, hidden)?;
            let o = ifo.narrow(1, 2 * hidden, hidden)?;
            let c = ((f * c)? + (i * g)?)?;
            State {
                h: (o * c.tanh()?)?,
                c: Some(c),
            }
        }
        ModelKind::Gru => {
            let rz = candle_nn::ops::sigmoid(&gates.narrow(1, 0, 2 * hidden)?)?;
            let r = rz.narrow(1, 0, hidden)?;
            let z = rz.narrow(1, hidden, hidden)?;
            let n_in = gates.narrow(1, 2 * hidden, hidden)?;
            let n_hid = gates.narrow(1, 3 * hidden, hidden)?;
            let n = (n_in + (r * n_hid)?)?.tanh()?;
            // h' = (1 - z) * n + z * h = n + z * (h - n)
            let h = (&n + (z * (&state.h - &n)?)?)?;
            State { h, c: None }
        }
    })
}

fn zero_state(config: &ModelConfig, rows: usize, like: &Tensor) -> Result<State> {
    let h = Tensor::zeros((rows, config.hidden_size), like.dtype(), like.device())?;
    let c = (config.kind == ModelKind::Lstm).then(|| h.clone());
    Ok(State { h, c })
}

/// Runs one layer forwards from `start` (sorted order; zeros without). Returns the per-step
/// outputs and each sequence's state at its own last step (sorted order).
fn run_forward(
    config: &ModelConfig,
    batch: &PackedBatch,
    below: &[Tensor],
    w: &CellWeights,
    start: Option<State>,
) -> Result<(Vec<Tensor>, State)> {
    let sizes = batch.batch_sizes();
    let mut state = match start {
        Some(s) => s,
        None => zero_state(config, sizes[0], &w.w)?,
    };
    let mut outputs = Vec::with_capacity(sizes.len());
    // States of sequences that ended, shortest (bottom rows) first.
    let mut done_h = Vec::new();
    let mut done_c = Vec::new();
    for (t, &rows) in sizes.iter().enumerate() {
        let running = state.h.dim(0)?;
        if rows < running {
            done_h.push(state.h.narrow(0, rows, running - rows)?);
            state.h = state.h.narrow(0, 0, rows)?;
            if let Some(c) = &state.c {
                done_c.push(c.narrow(0, rows, running - rows)?);
                state.c = Some(c.narrow(0, 0, rows)?);
            }
        }
        state = cell(config.kind, step_input(batch, below, t)?, &state, w)?;
        outputs.push(state.h.clone());
    }
    done_h.push(state.h);
    done_h.reverse();
    let h = cat_rows(done_h)?;
    let c = match state.c {
        Some(c) => {
            done_c.push(c);
            done_c.reverse();
            Some(cat_rows(done_c)?)
        }
        None => None,
    };
    Ok((outputs, State { h, c }))
}

/// Runs one layer backwards: each sequence starts from zeros at its own last real step. Returns
/// the per-step outputs (indexed by time) and the state after step 0 (sorted order).
fn run_backward(
    config: &ModelConfig,
    batch: &PackedBatch,
    below: &[Tensor],
    w: &CellWeights,
) -> Result<(Vec<Tensor>, State)> {
    let sizes = batch.batch_sizes();
    let steps = sizes.len();
    let mut state = zero_state(config, sizes[steps - 1], &w.w)?;
    let mut outputs = vec![None; steps];
    for t in (0..steps).rev() {
        let rows = sizes[t];
        let running = state.h.dim(0)?;
        if rows > running {
            let fresh = zero_state(config, rows - running, &w.w)?;
            state.h = Tensor::cat(&[&state.h, &fresh.h], 0)?;
            if let (Some(c), Some(fresh_c)) = (&state.c, &fresh.c) {
                state.c = Some(Tensor::cat(&[c, fresh_c], 0)?);
            }
        }
        state = cell(config.kind, step_input(batch, below, t)?, &state, w)?;
        outputs[t] = Some(state.h.clone());
    }
    let outputs = outputs.into_iter().flatten().collect();
    Ok((outputs, state))
}

/// The head's layers as `(Wᵀ, b)`, input side first.
fn head_weights(params: &Params) -> Result<Vec<(Tensor, Tensor)>> {
    params
        .config()
        .head_layers()
        .iter()
        .map(|l| {
            Ok((
                params.get(&l.weight)?.t()?.contiguous()?,
                params.get(&l.bias)?,
            ))
        })
        .collect()
}

/// `x` through the head: linear layers with a ReLU between each two (no dropout: evaluation).
fn apply_head(x: &Tensor, head: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let mut y = x.clone();
    for (i, (w, b)) in head.iter().enumerate() {
        y = y.matmul(w)?.broadcast_add(b)?;
        if i + 1 < head.len() {
            y = y.relu()?;
        }
    }
    Ok(y)
}

fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(if parts.len() == 1 {
        parts.swap_remove(0)
    } else {
        Tensor::cat(&parts, 0)?
    })
}

/// A unidirectional model prepared to run one sequence a few steps at a time.
#[derive(Debug, Clone)]
pub struct Streamer {
    config: ModelConfig,
    layers: Vec<CellWeights>,
    head: Vec<(Tensor, Tensor)>,
}

/// Where one sequence stands: every layer's state after the steps fed so far.
#[derive(Debug, Clone)]
pub struct StreamState {
    layers: Vec<State>,
    steps: u64,
}

impl StreamState {
    /// Steps fed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

impl Streamer {
    /// Prepares `params`' model; a bidirectional one cannot run step by step (its backward
    /// direction starts at the sequence's end).
    pub fn new(params: &Params) -> Result<Self> {
        let config = *params.config();
        if config.bidirectional {
            return Err(crate::Error::setting(
                "model",
                "a bidirectional model reads each sequence from its end and cannot predict step by step",
            ));
        }
        let model = ReferenceModel::new(params.clone());
        let layers = (0..config.num_layers)
            .map(|l| model.cell_weights(l, ""))
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            layers,
            head: head_weights(params)?,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The state before any step: zeros, as every sequence starts.
    pub fn start(&self) -> Result<StreamState> {
        let layers = self
            .layers
            .iter()
            .map(|w| zero_state(&self.config, 1, &w.w))
            .collect::<Result<_>>()?;
        Ok(StreamState { layers, steps: 0 })
    }

    /// Feeds `steps` (normalised, `input_size` values each) after `state` and returns the head's
    /// output after each of them (`output_size` values each): what a whole-sequence pass over
    /// the history so far would return at that step. `state` advances only when every step ran.
    pub fn feed(&self, state: &mut StreamState, steps: &[f32]) -> Result<Vec<f32>> {
        let n = self.config.input_size;
        if steps.is_empty() || !steps.len().is_multiple_of(n) {
            return Err(crate::Error::setting(
                "steps",
                format!("{} values are not whole steps of {n}", steps.len()),
            ));
        }
        let device = self.head[0].0.device();
        let mut layers = state.layers.clone();
        let mut out = Vec::with_capacity(steps.len() / n * self.config.output_size);
        for step in steps.chunks(n) {
            let mut x = Tensor::from_slice(step, (1, n), device)?;
            for (w, s) in self.layers.iter().zip(layers.iter_mut()) {
                let ones = Tensor::ones((1, 1), x.dtype(), device)?;
                *s = cell(self.config.kind, vec![x, ones], s, w)?;
                x = s.h.clone();
            }
            let y = apply_head(&x, &self.head)?;
            out.extend(y.flatten_all()?.to_vec1::<f32>()?);
        }
        state.layers = layers;
        state.steps += (steps.len() / n) as u64;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::SeqModel;
    use crate::step::{Batch, predict};

    #[test]
    fn streaming_a_sequence_in_pieces_matches_whole_prefixes_through_the_fused_model() {
        // The GRU runs under an MLP head: streaming applies it as the fused model does.
        for kind in [ModelKind::RnnTanh, ModelKind::Lstm, ModelKind::Gru] {
            let head: &[usize] = if kind == ModelKind::Gru { &[6, 3] } else { &[] };
            let config = ModelConfig {
                kind,
                input_size: 2,
                hidden_size: 5,
                num_layers: 2,
                bidirectional: false,
                output_size: 2,
                head: crate::model::HeadLayers::new(head).unwrap(),
            };
            let params = Params::init(config, 7, &Device::Cpu).unwrap();
            let xs: Vec<f32> = (0..18)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0)
                .collect();
            let streamer = Streamer::new(&params).unwrap();
            let mut state = streamer.start().unwrap();
            let mut streamed = Vec::new();
            for piece in [&xs[..2], &xs[2..8], &xs[8..]] {
                streamed.extend(streamer.feed(&mut state, piece).unwrap());
            }
            assert_eq!(state.steps(), 9);
            let fused = SeqModel::new(params.clone());
            for t in 1..=9 {
                let prefix = &xs[..2 * t];
                let batch = Batch::from_inputs(&[prefix], 2, &Device::Cpu).unwrap();
                let whole = predict(&fused, &batch).unwrap();
                for (a, b) in streamed[2 * (t - 1)..2 * t].iter().zip(&whole) {
                    assert!((a - b).abs() < 1e-5, "{kind} step {t}: {a} vs {b}");
                }
            }
            // A refused piece leaves the state as it was.
            assert!(streamer.feed(&mut state, &xs[..3]).is_err());
            assert_eq!(state.steps(), 9);
        }
        let bidirectional = ModelConfig {
            bidirectional: true,
            ..ModelConfig::tutorial()
        };
        let params = Params::init(bidirectional, 1, &Device::Cpu).unwrap();
        assert!(Streamer::new(&params).is_err());
    }
}
