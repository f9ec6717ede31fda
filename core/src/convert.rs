//! Conversions between the wire types of `recur-proto` and this crate's types. A missing or
//! out-of-range field becomes an error naming it, never a panic.

use recur_proto::v1 as pb;

use crate::metrics::{BatchSums, Metrics};
use crate::model::{ModelConfig, ModelKind};
use crate::{Error, Result};

impl From<ModelKind> for pb::ModelKind {
    fn from(kind: ModelKind) -> Self {
        match kind {
            ModelKind::RnnTanh => Self::RnnTanh,
            ModelKind::RnnRelu => Self::RnnRelu,
            ModelKind::Lstm => Self::Lstm,
            ModelKind::Gru => Self::Gru,
        }
    }
}

impl TryFrom<pb::ModelKind> for ModelKind {
    type Error = Error;

    fn try_from(kind: pb::ModelKind) -> Result<Self> {
        match kind {
            pb::ModelKind::RnnTanh => Ok(Self::RnnTanh),
            pb::ModelKind::RnnRelu => Ok(Self::RnnRelu),
            pb::ModelKind::Lstm => Ok(Self::Lstm),
            pb::ModelKind::Gru => Ok(Self::Gru),
            pb::ModelKind::Unspecified => Err(Error::InvalidConfig {
                field: "kind",
                problem: "is unspecified; use rnn_tanh, rnn_relu, lstm or gru".into(),
            }),
        }
    }
}

impl From<&ModelConfig> for pb::ModelConfig {
    fn from(c: &ModelConfig) -> Self {
        Self {
            kind: pb::ModelKind::from(c.kind) as i32,
            input_size: c.input_size as u32,
            hidden_size: c.hidden_size as u32,
            num_layers: c.num_layers as u32,
            bidirectional: c.bidirectional,
            output_size: c.output_size as u32,
        }
    }
}

impl TryFrom<&pb::ModelConfig> for ModelConfig {
    type Error = Error;

    fn try_from(c: &pb::ModelConfig) -> Result<Self> {
        let kind = pb::ModelKind::try_from(c.kind).map_err(|_| Error::InvalidConfig {
            field: "kind",
            problem: format!("{} is not a known model kind", c.kind),
        })?;
        let config = Self {
            kind: kind.try_into()?,
            input_size: c.input_size as usize,
            hidden_size: c.hidden_size as usize,
            num_layers: c.num_layers as usize,
            bidirectional: c.bidirectional,
            output_size: c.output_size as usize,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<&BatchSums> for pb::BatchSums {
    fn from(s: &BatchSums) -> Self {
        Self {
            rel_error: s.rel_error,
            squared_error: s.squared_error,
            abs_error: s.abs_error,
            exact: s.exact,
            samples: s.samples,
        }
    }
}

impl From<&pb::BatchSums> for BatchSums {
    fn from(s: &pb::BatchSums) -> Self {
        Self {
            rel_error: s.rel_error,
            squared_error: s.squared_error,
            abs_error: s.abs_error,
            exact: s.exact,
            samples: s.samples,
        }
    }
}

impl From<&Metrics> for pb::Metrics {
    fn from(m: &Metrics) -> Self {
        Self {
            accuracy: m.accuracy,
            loss: m.loss,
            mae: m.mae,
            exact: m.exact,
            samples: m.samples as u64,
        }
    }
}

impl From<&pb::Metrics> for Metrics {
    fn from(m: &pb::Metrics) -> Self {
        Self {
            accuracy: m.accuracy,
            loss: m.loss,
            mae: m.mae,
            exact: m.exact,
            samples: m.samples as usize,
        }
    }
}

/// A named tensor from its shape and values, checking that they agree.
pub fn tensor_to_proto(name: &str, shape: &[usize], values: &[f32]) -> pb::Tensor {
    pb::Tensor {
        name: name.to_string(),
        shape: shape.iter().map(|&d| d as u64).collect(),
        values: values.to_vec(),
    }
}

/// The shape and values of a wire tensor, checking that they agree.
pub fn tensor_from_proto(t: &pb::Tensor) -> Result<(Vec<usize>, &[f32])> {
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::setting(
                "shape",
                format!("tensor `{}`: shape {shape:?} overflows", t.name),
            )
        })?;
    crate::model::check_len("tensor values", t.values.len(), expected)?;
    Ok((shape, &t.values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_config_round_trips() {
        for kind in ModelKind::ALL {
            let c = ModelConfig {
                kind,
                input_size: 2,
                hidden_size: 7,
                num_layers: 3,
                bidirectional: true,
                output_size: 1,
            };
            let wire = pb::ModelConfig::from(&c);
            assert_eq!(ModelConfig::try_from(&wire).unwrap(), c);
        }
    }

    #[test]
    fn bad_wire_configs_name_the_field() {
        let mut wire = pb::ModelConfig::from(&ModelConfig::tutorial());
        wire.kind = 0;
        assert!(
            ModelConfig::try_from(&wire)
                .unwrap_err()
                .to_string()
                .contains("kind")
        );
        wire.kind = 99;
        assert!(
            ModelConfig::try_from(&wire)
                .unwrap_err()
                .to_string()
                .contains("kind")
        );
        let mut wire = pb::ModelConfig::from(&ModelConfig::tutorial());
        wire.num_layers = 0;
        assert!(
            ModelConfig::try_from(&wire)
                .unwrap_err()
                .to_string()
                .contains("num_layers")
        );
    }

    #[test]
    fn tensors_check_their_shape() {
        let t = tensor_to_proto("linear.bias", &[2], &[1.0, 2.0]);
        assert_eq!(tensor_from_proto(&t).unwrap().0, [2]);
        let bad = pb::Tensor {
            values: vec![1.0],
            ..t
        };
        assert!(tensor_from_proto(&bad).is_err());
    }
}
