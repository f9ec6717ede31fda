//! A model's parameters as candle variables, and their flat-vector form.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{ModelConfig, ParamLayout};
use crate::{Error, Result};

/// Every parameter of a model as one trainable candle variable, the flat vector in layout order
/// (sorted by name). Each named tensor is a view into it, so a gradient is one contiguous
/// vector, and parameters and gradients cross a device boundary as one buffer each.
#[derive(Debug, Clone)]
pub struct Params {
    config: ModelConfig,
    layout: ParamLayout,
    flat: Var,
}

impl Params {
    /// PyTorch's initialisation, seeded: every recurrent weight and bias from
    /// `U(-1/sqrt(hidden), 1/sqrt(hidden))`, the head as `nn.Linear` (`U(-1/sqrt(fan_in), ..)` for
    /// weight and bias). The same seed always gives the same values.
    pub fn init(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let layout = config.layout();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rnn_bound = 1.0 / (config.hidden_size as f32).sqrt();
        let head = config.head_layers();
        let mut flat = Vec::with_capacity(layout.total());
        for entry in layout.entries() {
            let bound = head
                .iter()
                .find(|l| l.weight == entry.name || l.bias == entry.name)
                .map_or(rnn_bound, |l| 1.0 / (l.input as f32).sqrt());
            flat.extend((0..entry.len).map(|_| rng.random_range(-bound..bound)));
        }
        Self::from_flat(config, &flat, device)
    }

    /// Parameters from a flat vector in layout order.
    pub fn from_flat(config: ModelConfig, flat: &[f32], device: &Device) -> Result<Self> {
        config.validate()?;
        let layout = config.layout();
        check_len("parameters", flat.len(), layout.total())?;
        let flat = Var::from_tensor(&Tensor::from_slice(flat, flat.len(), device)?)?;
        Ok(Self {
            config,
            layout,
            flat,
        })
    }

    /// Parameters from named tensors (a checkpoint or a PyTorch state_dict). Every name of the
    /// layout must be present with its exact shape; extra names are an error too.
    pub fn from_named(
        config: ModelConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, String> {
        config.validate().map_err(|e| e.to_string())?;
        let layout = config.layout();
        if let Some(extra) = tensors.keys().filter(|k| layout.get(k).is_none()).min() {
            return Err(format!(
                "unexpected tensor `{extra}` for a {} model",
                config.kind
            ));
        }
        let mut flat = Vec::with_capacity(layout.total());
        for e in layout.entries() {
            let t = tensors
                .get(&e.name)
                .ok_or_else(|| format!("missing tensor `{}`", e.name))?;
            if t.dims() != e.shape.as_slice() {
                return Err(format!(
                    "tensor `{}` has shape {:?}, the model needs {:?}",
                    e.name,
                    t.dims(),
                    e.shape
                ));
            }
            let values = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|err| format!("tensor `{}`: {err}", e.name))?;
            flat.extend(values);
        }
        Self::from_flat(config, &flat, device).map_err(|e| e.to_string())
    }

    /// The model shape these parameters belong to.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Names, shapes and offsets.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.flat.device()
    }

    /// The flat vector, `(total,)`, as the one trainable variable.
    pub fn flat(&self) -> &Var {
        &self.flat
    }

    /// The tensor with this name: a view of the flat variable, so gradients flow into it.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let e = self.layout.get(name).ok_or_else(|| Error::InvalidConfig {
            field: "parameters",
            problem: format!("no parameter `{name}` in a {} model", self.config.kind),
        })?;
        Ok(self
            .flat
            .narrow(0, e.offset, e.len)?
            .reshape(e.shape.as_slice())?)
    }

    /// Names with their tensors (views of the flat variable), in sorted-name order.
    pub fn named(&self) -> Result<Vec<(&str, Tensor)>> {
        self.layout
            .entries()
            .iter()
            .map(|e| Ok((e.name.as_str(), self.get(&e.name)?)))
            .collect()
    }

    /// All values in layout order.
    pub fn to_flat(&self) -> Result<Vec<f32>> {
        Ok(self.flat.to_vec1::<f32>()?)
    }

    /// Overwrites every value from a flat vector in layout order (one copy to the device).
    pub fn set_flat(&self, flat: &[f32]) -> Result<()> {
        check_len("parameters", flat.len(), self.layout.total())?;
        self.flat
            .set(&Tensor::from_slice(flat, flat.len(), self.flat.device())?)?;
        Ok(())
    }

    /// The gradient of every parameter from a backward pass, flattened in layout order (one
    /// copy from the device). Zeros when the loss does not depend on the parameters.
    pub fn grads_flat(&self, grads: &GradStore) -> Result<Vec<f32>> {
        match grads.get(self.flat.as_tensor()) {
            Some(g) => Ok(g.to_vec1::<f32>()?),
            None => Ok(vec![0.0; self.layout.total()]),
        }
    }

    /// The gradient of each named tensor, in sorted-name order, shaped like the tensor.
    pub fn grads_named(&self, grads: &GradStore) -> Result<Vec<(&str, Tensor)>> {
        let flat = Tensor::from_vec(self.grads_flat(grads)?, self.layout.total(), &Device::Cpu)?;
        self.layout
            .entries()
            .iter()
            .map(|e| {
                Ok((
                    e.name.as_str(),
                    flat.narrow(0, e.offset, e.len)?
                        .reshape(e.shape.as_slice())?,
                ))
            })
            .collect()
    }
}

pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::LengthMismatch {
            what,
            got,
            expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_bounded() {
        let config = ModelConfig::tutorial();
        let a = Params::init(config, 7, &Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
        let b = Params::init(config, 7, &Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
        let c = Params::init(config, 8, &Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = 1.0 / 8f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn flat_round_trip() {
        let config = ModelConfig::tutorial();
        let p = Params::init(config, 1, &Device::Cpu).unwrap();
        let flat: Vec<f32> = (0..config.layout().total()).map(|i| i as f32).collect();
        p.set_flat(&flat).unwrap();
        assert_eq!(p.to_flat().unwrap(), flat);
        let bias = p.get("linear.bias").unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bias, [0.0]);
        assert!(p.set_flat(&flat[1..]).is_err());
    }
}
