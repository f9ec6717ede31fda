//! The shape of a model and the layout of its parameters.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// `nn.RNN(nonlinearity="tanh")`.
    RnnTanh,
    /// `nn.RNN(nonlinearity="relu")`.
    RnnRelu,
    /// `nn.LSTM` (gates i, f, g, o).
    Lstm,
    /// `nn.GRU` (gates r, z, n).
    Gru,
}

impl ModelKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [ModelKind; 4] = [Self::RnnTanh, Self::RnnRelu, Self::Lstm, Self::Gru];

    /// Rows of `weight_ih` per hidden unit: 1 for RNNs, 4 for LSTM, 3 for GRU.
    pub fn gates(self) -> usize {
        match self {
            Self::RnnTanh | Self::RnnRelu => 1,
            Self::Lstm => 4,
            Self::Gru => 3,
        }
    }

    /// The name used on the command line, in manifests and in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RnnTanh => "rnn_tanh",
            Self::RnnRelu => "rnn_relu",
            Self::Lstm => "lstm",
            Self::Gru => "gru",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::InvalidConfig {
                field: "kind",
                problem: format!("`{s}` is not one of rnn_tanh, rnn_relu, lstm, gru"),
            })
    }
}

/// The shape of a model: recurrent layers plus a head (one linear layer, or an MLP) on the top
/// layer's last state (or on its output at every step, when trained so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The recurrent cell.
    pub kind: ModelKind,
    /// Features per time step (1 for a sequence of scalars).
    pub input_size: usize,
    /// Units per direction of each layer.
    pub hidden_size: usize,
    /// Stacked layers.
    pub num_layers: usize,
    /// Whether each layer also runs backwards over each sequence's real steps.
    pub bidirectional: bool,
    /// Values predicted per sequence.
    pub output_size: usize,
    /// Widths of the head's hidden layers, each followed by a ReLU (and dropout in training);
    /// empty for a single linear layer.
    #[serde(default, skip_serializing_if = "HeadLayers::is_empty")]
    pub head: HeadLayers,
}

/// The hidden widths of a model's head, at most [`HeadLayers::MAX`] of them. A fixed-size list
/// so that [`ModelConfig`] stays `Copy`; it reads and writes as a plain list of widths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "Vec<usize>", try_from = "Vec<usize>")]
pub struct HeadLayers {
    widths: [u32; HeadLayers::MAX],
    len: u8,
}

impl HeadLayers {
    /// Most hidden layers a head may have.
    pub const MAX: usize = 4;

    /// The head `Linear → ReLU → Linear …` with these hidden widths.
    pub fn new(widths: &[usize]) -> Result<Self> {
        if widths.len() > Self::MAX {
            return Err(Error::InvalidConfig {
                field: "head",
                problem: format!(
                    "has {} hidden layers, above the limit {}",
                    widths.len(),
                    Self::MAX
                ),
            });
        }
        let mut head = Self::default();
        for (i, &w) in widths.iter().enumerate() {
            if w == 0 || w > ModelConfig::MAX_DIM {
                return Err(Error::InvalidConfig {
                    field: "head",
                    problem: format!(
                        "hidden layer {} has width {w}; widths run from 1 to {}",
                        i + 1,
                        ModelConfig::MAX_DIM
                    ),
                });
            }
            head.widths[i] = w as u32;
        }
        head.len = widths.len() as u8;
        Ok(head)
    }

    /// The hidden widths, input side first.
    pub fn widths(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.widths[..usize::from(self.len)]
            .iter()
            .map(|&w| w as usize)
    }

    /// No hidden layer: the head is one linear layer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl From<HeadLayers> for Vec<usize> {
    fn from(h: HeadLayers) -> Self {
        h.widths().collect()
    }
}

impl TryFrom<Vec<usize>> for HeadLayers {
    type Error = Error;

    fn try_from(widths: Vec<usize>) -> Result<Self> {
        Self::new(&widths)
    }
}

/// One linear layer of a model's head and the names of its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadLayer {
    /// State-dict name of the weight, `(output, input)`.
    pub weight: String,
    /// State-dict name of the bias, `(output,)`.
    pub bias: String,
    /// Features in.
    pub input: usize,
    /// Values out.
    pub output: usize,
}

/// `gru hidden 16 x 2 layers, bidirectional, 3 in / 1 out`.
impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} hidden {}", self.kind, self.hidden_size)?;
        if self.num_layers != 1 {
            write!(f, " x {} layers", self.num_layers)?;
        }
        if self.bidirectional {
            f.write_str(", bidirectional")?;
        }
        if !self.head.is_empty() {
            let widths: Vec<String> = self.head.widths().map(|w| w.to_string()).collect();
            write!(f, ", head {}", widths.join("-"))?;
        }
        write!(f, ", {} in / {} out", self.input_size, self.output_size)
    }
}

impl ModelConfig {
    /// Values of one sequence's recurrent state, as a stateful run carries it from chunk to
    /// chunk: every layer's `h`, then (LSTM) every layer's `c`, `hidden_size` each (one
    /// direction).
    pub fn state_len(&self) -> usize {
        let per_layer = if self.kind == ModelKind::Lstm { 2 } else { 1 };
        self.num_layers * self.hidden_size * per_layer
    }

    /// The tutorial's model: one `rnn_tanh` layer of 8 units, one input and one output.
    pub fn tutorial() -> Self {
        Self {
            kind: ModelKind::RnnTanh,
            input_size: 1,
            hidden_size: 8,
            num_layers: 1,
            bidirectional: false,
            output_size: 1,
            head: HeadLayers::default(),
        }
    }

    /// Upper bound on every size field, far above anything that trains on one machine.
    pub const MAX_DIM: usize = 1 << 16;

    /// Checks every field, naming the first that is out of range.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, value: usize| {
            if value == 0 {
                Err(Error::InvalidConfig {
                    field,
                    problem: "must be at least 1".into(),
                })
            } else if value > Self::MAX_DIM {
                Err(Error::InvalidConfig {
                    field,
                    problem: format!("is {value}, above the limit {}", Self::MAX_DIM),
                })
            } else {
                Ok(())
            }
        };
        check("input_size", self.input_size)?;
        check("hidden_size", self.hidden_size)?;
        check("num_layers", self.num_layers)?;
        check("output_size", self.output_size)?;
        if self.num_layers > 64 {
            return Err(Error::InvalidConfig {
                field: "num_layers",
                problem: format!("is {}, above the limit 64", self.num_layers),
            });
        }
        Ok(())
    }

    /// 2 for a bidirectional model, else 1.
    pub fn directions(&self) -> usize {
        if self.bidirectional { 2 } else { 1 }
    }

    /// Width of the state the head reads: `directions * hidden_size`.
    pub fn head_input(&self) -> usize {
        self.directions() * self.hidden_size
    }

    /// Every parameter's name and shape, sorted by name: the flat-vector order.
    pub fn layout(&self) -> ParamLayout {
        let h = self.hidden_size;
        let g = self.kind.gates() * h;
        let mut shapes = BTreeMap::new();
        for layer in 0..self.num_layers {
            let layer_in = if layer == 0 {
                self.input_size
            } else {
                self.head_input()
            };
            for suffix in ["", "_reverse"].iter().take(self.directions()) {
                shapes.insert(format!("rnn.weight_ih_l{layer}{suffix}"), vec![g, layer_in]);
                shapes.insert(format!("rnn.weight_hh_l{layer}{suffix}"), vec![g, h]);
                shapes.insert(format!("rnn.bias_ih_l{layer}{suffix}"), vec![g]);
                shapes.insert(format!("rnn.bias_hh_l{layer}{suffix}"), vec![g]);
            }
        }
        for layer in self.head_layers() {
            shapes.insert(layer.weight, vec![layer.output, layer.input]);
            shapes.insert(layer.bias, vec![layer.output]);
        }
        ParamLayout::new(shapes)
    }

    /// The head's linear layers, input side first, named as PyTorch names them: `linear.*` for a
    /// single layer (`nn.Linear`), else `head.{3i}.*`, the linear layers of
    /// `nn.Sequential(Linear, ReLU, Dropout, Linear, ReLU, Dropout, …, Linear)`.
    pub fn head_layers(&self) -> Vec<HeadLayer> {
        let mut sizes = vec![self.head_input()];
        sizes.extend(self.head.widths());
        sizes.push(self.output_size);
        sizes
            .windows(2)
            .enumerate()
            .map(|(i, io)| {
                let prefix = if self.head.is_empty() {
                    "linear".to_string()
                } else {
                    format!("head.{}", 3 * i)
                };
                HeadLayer {
                    weight: format!("{prefix}.weight"),
                    bias: format!("{prefix}.bias"),
                    input: io[0],
                    output: io[1],
                }
            })
            .collect()
    }
}

/// Parameter names and shapes in sorted-name order, with each one's offset in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    total: usize,
}

/// One parameter's place in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamEntry {
    /// PyTorch's state_dict name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Index of its first value in the flat vector.
    pub offset: usize,
    /// Number of values.
    pub len: usize,
}

impl ParamLayout {
    fn new(shapes: BTreeMap<String, Vec<usize>>) -> Self {
        let mut offset = 0;
        let entries = shapes
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let entry = ParamEntry {
                    name,
                    shape,
                    offset,
                    len,
                };
                offset += len;
                entry
            })
            .collect();
        Self {
            entries,
            total: offset,
        }
    }

    /// The parameters, sorted by name.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// Total number of values.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The entry with this name.
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tutorial_layout_matches_pytorch_state_dict() {
        let layout = ModelConfig::tutorial().layout();
        let names: Vec<_> = layout.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "linear.bias",
                "linear.weight",
                "rnn.bias_hh_l0",
                "rnn.bias_ih_l0",
                "rnn.weight_hh_l0",
                "rnn.weight_ih_l0"
            ]
        );
        // nn.RNN(1, 8) + nn.Linear(8, 1): 8 + 64 + 8 + 8 + 8 + 1 = 97.
        assert_eq!(layout.total(), 97);
        assert_eq!(layout.get("rnn.weight_hh_l0").unwrap().shape, [8, 8]);
    }

    #[test]
    fn bidirectional_two_layer_lstm_shapes() {
        let config = ModelConfig {
            kind: ModelKind::Lstm,
            input_size: 3,
            hidden_size: 5,
            num_layers: 2,
            bidirectional: true,
            output_size: 2,
            head: Default::default(),
        };
        let layout = config.layout();
        assert_eq!(
            layout.get("rnn.weight_ih_l1_reverse").unwrap().shape,
            [20, 10]
        );
        assert_eq!(layout.get("rnn.weight_ih_l0").unwrap().shape, [20, 3]);
        assert_eq!(layout.get("linear.weight").unwrap().shape, [2, 10]);
        // sum(p.numel() for p in nn.LSTM(3, 5, 2, bidirectional=True).parameters()) == 1080
        assert_eq!(layout.total(), 1080 + 2 * 10 + 2);
    }

    /// An MLP head is named as the linear layers of `nn.Sequential(Linear, ReLU, Dropout, …)`,
    /// and the manifest form lists its widths (and leaves them out for a single linear layer).
    #[test]
    fn mlp_head_layout_matches_pytorch_sequential() {
        let mut config = ModelConfig::tutorial();
        config.output_size = 2;
        config.head = HeadLayers::new(&[5, 4]).unwrap();
        let layout = config.layout();
        assert_eq!(layout.get("head.0.weight").unwrap().shape, [5, 8]);
        assert_eq!(layout.get("head.3.weight").unwrap().shape, [4, 5]);
        assert_eq!(layout.get("head.6.weight").unwrap().shape, [2, 4]);
        assert_eq!(layout.get("head.6.bias").unwrap().shape, [2]);
        assert!(layout.get("linear.weight").is_none());
        // RNN(1, 8): 88; Linear(8,5) 45 + Linear(5,4) 24 + Linear(4,2) 10.
        assert_eq!(layout.total(), 88 + 45 + 24 + 10);
        assert_eq!(
            config.to_string(),
            "rnn_tanh hidden 8, head 5-4, 1 in / 2 out"
        );
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"head\":[5,4]"), "{json}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), config);
        let plain = serde_json::to_string(&ModelConfig::tutorial()).unwrap();
        assert!(!plain.contains("head"), "{plain}");
        assert_eq!(
            serde_json::from_str::<ModelConfig>(&plain).unwrap(),
            ModelConfig::tutorial()
        );
        assert!(HeadLayers::new(&[1, 2, 3, 4, 5]).is_err());
        assert!(
            HeadLayers::new(&[3, 0])
                .unwrap_err()
                .to_string()
                .contains("layer 2")
        );
        assert!(serde_json::from_str::<ModelConfig>(&json.replace("[5,4]", "[5,0]")).is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let mut config = ModelConfig::tutorial();
        config.hidden_size = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
        assert!("gru".parse::<ModelKind>().is_ok());
        assert!("transformer".parse::<ModelKind>().is_err());
    }
}
