//! Conversions between the wire types of `recur-proto` and this crate's types. A missing or
//! out-of-range field becomes an error naming it, never a panic.

use recur_proto::Bytes;
use recur_proto::v1 as pb;

use crate::data::Affine;
use crate::metrics::{BatchSums, Metrics};
use crate::model::{HeadLayers, ModelConfig, ModelKind};
use crate::step::Loss;
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
            head: c.head.widths().map(|w| w as u32).collect(),
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
            head: HeadLayers::new(&c.head.iter().map(|&w| w as usize).collect::<Vec<_>>())?,
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
            labelled: s.labelled,
            true_pos: s.true_pos,
            false_pos: s.false_pos,
            false_neg: s.false_neg,
        }
    }
}

impl From<Loss> for pb::Loss {
    fn from(l: Loss) -> Self {
        match l {
            Loss::Mse => Self::Mse,
            Loss::Bce => Self::Bce,
        }
    }
}

impl From<&Affine> for pb::Affine {
    fn from(a: &Affine) -> Self {
        Self {
            shift: a.shift,
            scale: a.scale,
        }
    }
}

impl From<&pb::Affine> for Affine {
    fn from(a: &pb::Affine) -> Self {
        Self {
            shift: a.shift,
            scale: a.scale,
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
            labelled: s.labelled,
            true_pos: s.true_pos,
            false_pos: s.false_pos,
            false_neg: s.false_neg,
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
            precision: m.precision,
            recall: m.recall,
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
            precision: m.precision,
            recall: m.recall,
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

/// A flat float vector as it travels (`FlatVector.values`, `StepResult.grad_sum`): little-endian
/// float32, 4 bytes each.
pub fn f32s_to_wire(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// The floats of a flat vector as it travels; `field` names it in the error when its length is
/// not a multiple of 4.
pub fn f32s_from_wire(bytes: &[u8], field: &'static str) -> Result<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::InvalidConfig {
            field,
            problem: format!("{} bytes is not a whole number of float32s", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The index of the first value of a flat vector as it travels that is NaN or infinite.
pub fn first_non_finite_wire(bytes: &[u8]) -> Option<usize> {
    bytes
        .chunks_exact(4)
        .position(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
}

/// Adds a flat vector as it travels to `sum`, element by element; false (and `sum` unchanged)
/// when the lengths differ.
pub fn add_wire_f32s(sum: &mut [f32], bytes: &[u8]) -> bool {
    if bytes.len() != sum.len() * 4 {
        return false;
    }
    for (a, c) in sum.iter_mut().zip(bytes.chunks_exact(4)) {
        *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    true
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
                head: HeadLayers::new(&[kind.gates() * 3, 2]).unwrap(),
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

    #[test]
    fn flat_vectors_travel_as_the_bytes_of_packed_floats() {
        let values = [0.0f32, -1.5, f32::MIN_POSITIVE, 3.25e7, f32::NAN];
        let wire = f32s_to_wire(&values);
        // `Tensor.values` (field 3) is a packed `repeated float`: tag, length, then the floats.
        let packed = pb::Tensor {
            values: values.to_vec(),
            ..Default::default()
        };
        let encoded = prost::Message::encode_to_vec(&packed);
        assert_eq!(&encoded[2..], &wire[..], "the same bytes as packed floats");
        let back = f32s_from_wire(&wire, "values").unwrap();
        assert_eq!(back.len(), values.len());
        for (a, b) in back.iter().zip(&values) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        let err = f32s_from_wire(&wire[..7], "values")
            .unwrap_err()
            .to_string();
        assert!(err.contains("values") && err.contains("7 bytes"), "{err}");
        let mut sum = vec![1.0f32; 5];
        assert!(add_wire_f32s(
            &mut sum,
            &f32s_to_wire(&[1.0, 2.0, 3.0, 4.0, 5.0])
        ));
        assert_eq!(sum, [2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(!add_wire_f32s(&mut sum, &wire[..8]));
        assert_eq!(
            sum,
            [2.0, 3.0, 4.0, 5.0, 6.0],
            "unchanged on a length mismatch"
        );
    }
}
