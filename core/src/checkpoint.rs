//! Checkpoints: parameters as safetensors under PyTorch's names, a JSON manifest, and the
//! optimizer state in a second safetensors file. Every file is written atomically.
//!
//! A checkpoint `stem` in `dir` is three files:
//! - `stem.safetensors`: the parameters (float32), loadable by `safetensors.torch.load_file`
//!   and then `load_state_dict` into the equivalent PyTorch module;
//! - `stem.optim.safetensors`: optimizer buffers (same order and length as the flat vector);
//! - `stem.json`: the [`Manifest`], written last, so a manifest always describes complete files.
//!   The parameter file carries the manifest's `step` in its metadata, which is checked on load.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::Normalizer;
use crate::metrics::Metrics;
use crate::model::{ModelConfig, Params};
use crate::optim::{LrScheduler, OptimizerConfig, OptimizerState};
use crate::{Error, Result};

/// The manifest format this build writes. Version 2 added per-column normalisation
/// (`normalizer`) and the loss: a build that reads only version 1 refuses such a manifest
/// instead of misreading `scale`.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest manifest format this build reads (version 1: one divisor, MSE).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// What a checkpoint holds besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for files this build wrote.
    pub format_version: u32,
    /// The model's shape.
    pub model: ModelConfig,
    /// Values were divided by this before training; predictions are multiplied back.
    pub scale: f32,
    /// Epochs completed when the checkpoint was taken.
    pub epoch: u64,
    /// Optimizer steps applied.
    pub step: u64,
    /// Validation metrics of these parameters, if measured.
    pub validation: Option<Metrics>,
    /// Test metrics of these parameters, if measured.
    pub test: Option<Metrics>,
    /// The optimizer, when its state is saved beside the parameters.
    pub optimizer: Option<OptimizerConfig>,
    /// The learning-rate schedule's state, to resume it.
    pub scheduler: Option<LrScheduler>,
    /// The learning rate the next step would use.
    pub lr: Option<f64>,
    /// Free-form position data of the trainer that wrote it (for example the epoch's batch
    /// cursor), opaque to this module.
    #[serde(default)]
    pub position: BTreeMap<String, u64>,
    /// Per-column maps from raw values to the model's (a series job's); absent, every column is
    /// divided by `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalizer: Option<Normalizer>,
    /// What the model was trained on: for `bce`, its outputs are logits of 0/1 labels and
    /// predictions are their probabilities.
    #[serde(default)]
    pub loss: crate::step::Loss,
}

impl Manifest {
    /// The maps from raw values to the model's: the stored per-column ones, or `scale` for
    /// every input feature and target.
    pub fn normalizer(&self) -> Normalizer {
        self.normalizer.clone().unwrap_or_else(|| {
            Normalizer::uniform(self.scale, self.model.input_size, self.model.output_size)
        })
    }
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The manifest.
    pub manifest: Manifest,
    /// Parameters in the flat-vector order of `manifest.model`.
    pub params: Vec<f32>,
    /// Optimizer buffers, when saved.
    pub optimizer: Option<OptimizerState>,
}

/// The three paths of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPaths {
    /// `stem.safetensors`.
    pub model: PathBuf,
    /// `stem.optim.safetensors`.
    pub optimizer: PathBuf,
    /// `stem.json`.
    pub manifest: PathBuf,
}

impl CheckpointPaths {
    /// The paths of checkpoint `stem` in `dir`.
    pub fn new(dir: &Path, stem: &str) -> Self {
        Self {
            model: dir.join(format!("{stem}.safetensors")),
            optimizer: dir.join(format!("{stem}.optim.safetensors")),
            manifest: dir.join(format!("{stem}.json")),
        }
    }
}

impl Checkpoint {
    /// Writes the checkpoint: tensors first, manifest last, each file atomically.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<CheckpointPaths> {
        let paths = CheckpointPaths::new(dir, stem);
        let layout = self.manifest.model.layout();
        crate::model::check_len("parameters", self.params.len(), layout.total())?;
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert("recur_step".to_string(), self.manifest.step.to_string());
        let named = layout.entries().iter().map(|e| {
            (
                e.name.clone(),
                e.shape.clone(),
                &self.params[e.offset..e.offset + e.len],
            )
        });
        atomic_write(&paths.model, &encode(named, meta.clone(), &paths.model)?)?;
        if let Some(state) = &self.optimizer {
            meta.insert("recur_optimizer_step".to_string(), state.step.to_string());
            let named = state
                .buffers
                .iter()
                .map(|(name, buf)| (name.clone(), vec![buf.len()], buf.as_slice()));
            atomic_write(&paths.optimizer, &encode(named, meta, &paths.optimizer)?)?;
        }
        let json = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| Error::checkpoint(&paths.manifest, e.to_string()))?;
        atomic_write(&paths.manifest, &json)?;
        Ok(paths)
    }

    /// Reads checkpoint `stem` from `dir`, checking the manifest's version, every parameter's
    /// name and shape, and that the files belong together.
    pub fn load(dir: &Path, stem: &str) -> Result<Self> {
        let paths = CheckpointPaths::new(dir, stem);
        let json = fs::read(&paths.manifest).map_err(|e| Error::io(&paths.manifest, e))?;
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|e| Error::checkpoint(&paths.manifest, format!("bad manifest: {e}")))?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(Error::checkpoint(
                &paths.manifest,
                format!(
                    "format version {} is not one this build reads ({OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                    manifest.format_version
                ),
            ));
        }
        manifest
            .model
            .validate()
            .and_then(|()| {
                manifest
                    .normalizer()
                    .validate(manifest.model.input_size, manifest.model.output_size)
            })
            .map_err(|e| Error::checkpoint(&paths.manifest, e.to_string()))?;
        let bytes = fs::read(&paths.model).map_err(|e| Error::io(&paths.model, e))?;
        let (tensors, meta) = decode(&bytes, &paths.model)?;
        check_step(&meta, "recur_step", manifest.step, &paths.model)?;
        let layout = manifest.model.layout();
        let mut params = Vec::with_capacity(layout.total());
        if let Some(extra) = tensors.keys().find(|k| layout.get(k).is_none()) {
            return Err(Error::checkpoint(
                &paths.model,
                format!("unexpected tensor `{extra}`"),
            ));
        }
        for e in layout.entries() {
            let (shape, values) = tensors.get(&e.name).ok_or_else(|| {
                Error::checkpoint(&paths.model, format!("missing tensor `{}`", e.name))
            })?;
            if *shape != e.shape {
                return Err(Error::checkpoint(
                    &paths.model,
                    format!(
                        "tensor `{}` has shape {shape:?}, the manifest's model needs {:?}",
                        e.name, e.shape
                    ),
                ));
            }
            params.extend_from_slice(values);
        }
        let optimizer = match manifest.optimizer {
            None => None,
            Some(_) => {
                let bytes =
                    fs::read(&paths.optimizer).map_err(|e| Error::io(&paths.optimizer, e))?;
                let (tensors, meta) = decode(&bytes, &paths.optimizer)?;
                check_step(&meta, "recur_step", manifest.step, &paths.optimizer)?;
                let step = meta
                    .get("recur_optimizer_step")
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        Error::checkpoint(&paths.optimizer, "no optimizer step in metadata")
                    })?;
                let mut buffers = BTreeMap::new();
                for (name, (_, values)) in tensors {
                    if values.len() != layout.total() {
                        return Err(Error::checkpoint(
                            &paths.optimizer,
                            format!(
                                "buffer `{name}` has {} values, the model has {}",
                                values.len(),
                                layout.total()
                            ),
                        ));
                    }
                    buffers.insert(name, values);
                }
                Some(OptimizerState { step, buffers })
            }
        };
        Ok(Self {
            manifest,
            params,
            optimizer,
        })
    }

    /// The parameters as a model on `device`.
    pub fn params(&self, device: &Device) -> Result<Params> {
        Params::from_flat(self.manifest.model, &self.params, device)
    }
}

/// Loads a PyTorch `state_dict` saved with `safetensors.torch.save_file` for a model of shape
/// `config` (names `rnn.*`, and `linear.*` or the head's `head.{3i}.*`). Float32 and float64 tensors are accepted.
pub fn load_state_dict(path: &Path, config: ModelConfig, device: &Device) -> Result<Params> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let (tensors, _) = decode(&bytes, path)?;
    let tensors = tensors
        .into_iter()
        .map(|(name, (shape, values))| Ok((name, Tensor::from_vec(values, shape, device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Params::from_named(config, &tensors, device).map_err(|problem| Error::checkpoint(path, problem))
}

/// The step recorded in a parameter file's metadata, to check that it belongs with a manifest.
pub fn model_file_step(bytes: &[u8]) -> Option<u64> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).ok()?;
    metadata
        .metadata()
        .as_ref()?
        .get("recur_step")?
        .parse()
        .ok()
}

fn check_step(meta: &HashMap<String, String>, key: &str, step: u64, path: &Path) -> Result<()> {
    match meta.get(key).and_then(|s| s.parse::<u64>().ok()) {
        Some(s) if s == step => Ok(()),
        Some(s) => Err(Error::checkpoint(
            path,
            format!(
                "holds step {s} but the manifest says step {step}: the files do not belong together"
            ),
        )),
        None => Err(Error::checkpoint(
            path,
            format!("no `{key}` in the file's metadata"),
        )),
    }
}

type Decoded = (
    BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    HashMap<String, String>,
);

fn decode(bytes: &[u8], path: &Path) -> Result<Decoded> {
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            other => {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor `{name}` is {other:?}; save it as float32"),
                ));
            }
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok((out, metadata.metadata().clone().unwrap_or_default()))
}

fn encode<'a>(
    named: impl Iterator<Item = (String, Vec<usize>, &'a [f32])>,
    meta: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .map(|(name, shape, values)| {
            (
                name,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = owned
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::checkpoint(path, e.to_string()))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a
/// temporary file in the same directory, fsynced, renamed over `path`, then the directory fsynced.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    // A bare file name's parent is "", which names no directory: it is the current one.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::checkpoint(path, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;
    use crate::optim::{Optimizer, OptimizerConfig};

    fn sample() -> Checkpoint {
        let model = ModelConfig {
            kind: ModelKind::Gru,
            input_size: 1,
            hidden_size: 4,
            num_layers: 2,
            bidirectional: true,
            output_size: 1,
            head: Default::default(),
        };
        let params = Params::init(model, 3, &Device::Cpu)
            .unwrap()
            .to_flat()
            .unwrap();
        let mut opt = Optimizer::new(OptimizerConfig::adam(0.01), params.len()).unwrap();
        let mut p = params.clone();
        opt.step(&mut p, &vec![0.5; params.len()]).unwrap();
        Checkpoint {
            manifest: Manifest {
                format_version: FORMAT_VERSION,
                model,
                scale: 50.0,
                epoch: 3,
                step: 180,
                validation: Some(Metrics {
                    accuracy: 0.9,
                    ..Metrics::default()
                }),
                test: None,
                optimizer: Some(*opt.config()),
                scheduler: None,
                lr: Some(0.01),
                position: BTreeMap::from([("batch".to_string(), 7)]),
                normalizer: None,
                loss: Default::default(),
            },
            params: p,
            optimizer: Some(opt.state().clone()),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = sample();
        ckpt.save(dir.path(), "latest").unwrap();
        let back = Checkpoint::load(dir.path(), "latest").unwrap();
        assert_eq!(back, ckpt);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn mismatches_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = sample();
        ckpt.save(dir.path(), "a").unwrap();
        // A manifest claiming another shape.
        let mut other = ckpt.clone();
        other.manifest.model.hidden_size = 5;
        let json = serde_json::to_vec(&other.manifest).unwrap();
        fs::write(dir.path().join("a.json"), json).unwrap();
        let err = Checkpoint::load(dir.path(), "a").unwrap_err().to_string();
        assert!(
            err.contains("has shape") && err.contains("a.safetensors"),
            "{err}"
        );
        // Files from different steps.
        ckpt.save(dir.path(), "b").unwrap();
        let mut later = ckpt.clone();
        later.manifest.step += 1;
        let json = serde_json::to_vec(&later.manifest).unwrap();
        fs::write(dir.path().join("b.json"), json).unwrap();
        let err = Checkpoint::load(dir.path(), "b").unwrap_err().to_string();
        assert!(err.contains("do not belong together"), "{err}");
        // A damaged file.
        ckpt.save(dir.path(), "c").unwrap();
        fs::write(dir.path().join("c.safetensors"), b"garbage").unwrap();
        let err = Checkpoint::load(dir.path(), "c").unwrap_err().to_string();
        assert!(err.contains("not a safetensors file"), "{err}");
        let err = Checkpoint::load(dir.path(), "missing")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
