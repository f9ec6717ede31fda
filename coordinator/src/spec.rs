//! A job's specification, converted from and to the wire and validated against the limits.

use recur_core::data::{ColumnScale, Label, Missing, Scale, SeriesSpec, SplitFractions};
use recur_core::model::ModelConfig;
use recur_core::optim::{LrSchedule, OptimizerConfig};
use recur_core::step::Loss;
use recur_core::train::TrainConfig;
use recur_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::ids::{DatasetId, JobId};
use crate::{Error, Result};

/// Everything a job needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// A label for people.
    pub name: String,
    /// The dataset.
    pub dataset: DatasetId,
    /// Model, optimizer, schedule, batch size, stopping rules, seed, scale, split.
    pub train: TrainConfig,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<u64>,
    /// Write the `latest` checkpoint every this many epochs.
    pub checkpoint_every: u64,
    /// The job whose best parameters this one starts from (fine-tuning).
    #[serde(default)]
    pub init_from: Option<JobId>,
    /// How a series dataset becomes samples (none for rows).
    #[serde(default)]
    pub series: Option<SeriesSpec>,
}

fn series_from_proto(s: &pb::SeriesSpec) -> Result<SeriesSpec> {
    let mut column_scales: Vec<ColumnScale> = s
        .column_scales
        .iter()
        .map(|(column, &scale)| ColumnScale {
            column: column.clone(),
            scale,
        })
        .collect();
    column_scales.sort_by(|a, b| a.column.cmp(&b.column));
    let spec = SeriesSpec {
        features: s.features.clone(),
        targets: s.targets.clone(),
        window: s.window as usize,
        stride: (s.stride as usize).max(1),
        horizon: s.horizon as usize,
        missing: if s.drop_missing {
            Missing::Drop
        } else {
            Missing::Refuse
        },
        order_by: (!s.order_by.is_empty()).then(|| s.order_by.clone()),
        column_scales,
        label: match pb::LabelRule::try_from(s.label) {
            Ok(pb::LabelRule::None) => None,
            Ok(pb::LabelRule::Rises) => Some(Label::Rises),
            Err(_) => {
                return Err(invalid(
                    "series.label",
                    format!("{} is not a known label rule", s.label),
                ));
            }
        },
        every_step: s.every_step,
    };
    spec.validate()
        .map_err(|e| Error::InvalidArgument(format!("series: {e}")))?;
    Ok(spec)
}

fn series_to_proto(s: &SeriesSpec, stateful: usize) -> pb::SeriesSpec {
    pb::SeriesSpec {
        features: s.features.clone(),
        targets: s.targets.clone(),
        window: s.window as u32,
        stride: s.stride as u32,
        horizon: s.horizon as u32,
        drop_missing: s.missing == Missing::Drop,
        order_by: s.order_by.clone().unwrap_or_default(),
        column_scales: s
            .column_scales
            .iter()
            .map(|c| (c.column.clone(), c.scale))
            .collect(),
        label: match s.label {
            None => pb::LabelRule::None,
            Some(Label::Rises) => pb::LabelRule::Rises,
        } as i32,
        every_step: s.every_step,
        stateful: stateful as u32,
    }
}

/// Most bytes of recurrent state a stateful job's step carries (every stream's).
const MAX_STATE_BYTES: usize = 16 << 20;

/// A stateful job's streams, checked against its series and model: consecutive windows with a
/// target at every step, a unidirectional model, the states of a step within bounds (0 when the
/// job is not stateful).
fn stateful_streams(
    s: &pb::JobSpec,
    series: Option<&SeriesSpec>,
    model: &ModelConfig,
    max_batch: usize,
) -> Result<usize> {
    let streams = s.series.as_ref().map_or(0, |w| w.stateful as usize);
    let Some(series) = series.filter(|_| streams > 0) else {
        return Ok(0);
    };
    if !series.every_step {
        return Err(invalid(
            "series.stateful",
            "needs every_step: a stateful run trains on a target at every step of each window",
        ));
    }
    if series.stride != series.window {
        return Err(invalid(
            "series.stateful",
            format!(
                "needs stride equal to window (consecutive windows, each continuing the one \
                 before); got window {} and stride {}",
                series.window, series.stride
            ),
        ));
    }
    if model.bidirectional {
        return Err(invalid(
            "series.stateful",
            "needs a unidirectional model (a bidirectional one's backward direction starts at \
             each window's end, so there is no state to carry)",
        ));
    }
    if streams > max_batch {
        return Err(invalid(
            "series.stateful",
            format!("{streams} streams (rows per step) is above the batch limit of {max_batch}"),
        ));
    }
    let bytes = streams * model.state_len() * 4;
    if bytes > MAX_STATE_BYTES {
        return Err(invalid(
            "series.stateful",
            format!(
                "{streams} streams of {} state values each make {bytes} bytes of state a step, \
                 above the limit of {MAX_STATE_BYTES}; use fewer streams",
                model.state_len()
            ),
        ));
    }
    Ok(streams)
}

/// Bounds a job spec must respect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpecLimits {
    /// Most parameters a model may have.
    pub max_params: usize,
    /// Largest batch.
    pub max_batch: usize,
}

fn invalid(field: &str, problem: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{field} {problem}"))
}

fn optimizer(spec: Option<&pb::OptimizerSpec>) -> Result<OptimizerConfig> {
    use pb::optimizer_spec::Kind;
    let default = pb::OptimizerSpec::default();
    let o = spec.unwrap_or(&default);
    let kind = Kind::try_from(o.kind).map_err(|_| {
        invalid(
            "optimizer.kind",
            format!("{} is not a known optimizer", o.kind),
        )
    })?;
    let lr =
        o.lr.unwrap_or(if kind == Kind::Adadelta { 1.0 } else { 0.01 });
    let config = match kind {
        Kind::Sgd => OptimizerConfig::Sgd {
            lr,
            momentum: o.momentum.unwrap_or(0.0),
            dampening: o.dampening.unwrap_or(0.0),
            weight_decay: o.weight_decay.unwrap_or(0.0),
            nesterov: o.nesterov,
        },
        Kind::Unspecified | Kind::Adam => OptimizerConfig::Adam {
            lr,
            beta1: o.beta1.unwrap_or(0.9),
            beta2: o.beta2.unwrap_or(0.999),
            eps: o.eps.unwrap_or(1e-8),
            weight_decay: o.weight_decay.unwrap_or(0.0),
        },
        Kind::Adamw => OptimizerConfig::AdamW {
            lr,
            beta1: o.beta1.unwrap_or(0.9),
            beta2: o.beta2.unwrap_or(0.999),
            eps: o.eps.unwrap_or(1e-8),
            weight_decay: o.weight_decay.unwrap_or(0.01),
        },
        Kind::Adadelta => OptimizerConfig::Adadelta {
            lr,
            rho: o.rho.unwrap_or(0.9),
            eps: o.eps.unwrap_or(1e-6),
            weight_decay: o.weight_decay.unwrap_or(0.0),
        },
    };
    config
        .validate()
        .map_err(|e| Error::InvalidArgument(format!("optimizer: {e}")))?;
    Ok(config)
}

fn optimizer_to_proto(c: &OptimizerConfig) -> pb::OptimizerSpec {
    use pb::optimizer_spec::Kind;
    match *c {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        } => pb::OptimizerSpec {
            kind: Kind::Sgd as i32,
            lr: Some(lr),
            momentum: Some(momentum),
            dampening: Some(dampening),
            weight_decay: Some(weight_decay),
            nesterov,
            ..Default::default()
        },
        OptimizerConfig::Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        }
        | OptimizerConfig::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => pb::OptimizerSpec {
            kind: if matches!(c, OptimizerConfig::Adam { .. }) {
                Kind::Adam
            } else {
                Kind::Adamw
            } as i32,
            lr: Some(lr),
            beta1: Some(beta1),
            beta2: Some(beta2),
            eps: Some(eps),
            weight_decay: Some(weight_decay),
            ..Default::default()
        },
        OptimizerConfig::Adadelta {
            lr,
            rho,
            eps,
            weight_decay,
        } => pb::OptimizerSpec {
            kind: Kind::Adadelta as i32,
            lr: Some(lr),
            rho: Some(rho),
            eps: Some(eps),
            weight_decay: Some(weight_decay),
            ..Default::default()
        },
    }
}

fn schedule(spec: Option<&pb::ScheduleSpec>) -> Result<LrSchedule> {
    use pb::schedule_spec::Kind;
    let schedule = match spec.and_then(|s| s.kind.as_ref()) {
        None => TrainConfig::default().schedule,
        Some(Kind::Constant(_)) => LrSchedule::Constant,
        Some(Kind::Step(s)) => LrSchedule::Step {
            step_size: s.step_size,
            gamma: s.gamma,
        },
        Some(Kind::Cosine(c)) => LrSchedule::Cosine {
            t_max: c.t_max,
            eta_min: c.eta_min,
        },
        Some(Kind::Plateau(p)) => LrSchedule::Plateau {
            factor: p.factor,
            patience: p.patience,
            threshold: p.threshold.unwrap_or(1e-4),
            cooldown: p.cooldown,
            min_lr: p.min_lr,
        },
    };
    schedule
        .validate()
        .map_err(|e| Error::InvalidArgument(format!("schedule: {e}")))?;
    Ok(schedule)
}

fn schedule_to_proto(s: &LrSchedule) -> pb::ScheduleSpec {
    use pb::schedule_spec::{Constant, Cosine, Kind, Plateau, StepDecay};
    let kind = match *s {
        LrSchedule::Constant => Kind::Constant(Constant {}),
        LrSchedule::Step { step_size, gamma } => Kind::Step(StepDecay { step_size, gamma }),
        LrSchedule::Cosine { t_max, eta_min } => Kind::Cosine(Cosine { t_max, eta_min }),
        LrSchedule::Plateau {
            factor,
            patience,
            threshold,
            cooldown,
            min_lr,
        } => Kind::Plateau(Plateau {
            factor,
            patience,
            threshold: Some(threshold),
            cooldown,
            min_lr,
        }),
    };
    pb::ScheduleSpec { kind: Some(kind) }
}

impl JobSpec {
    /// Converts and checks a wire spec: every out-of-range field is named.
    pub fn from_proto(s: &pb::JobSpec, limits: &SpecLimits) -> Result<Self> {
        let dataset = DatasetId::parse(&s.dataset_id).ok_or_else(|| {
            invalid(
                "dataset_id",
                format!(
                    "`{}` is not a dataset id (64 hex digits from UploadDataset)",
                    s.dataset_id
                ),
            )
        })?;
        let series = s.series.as_ref().map(series_from_proto).transpose()?;
        let mut wire_model = s
            .model
            .clone()
            .unwrap_or_else(|| (&ModelConfig::tutorial()).into());
        if let Some(series) = &series {
            // Unset sizes are the numbers of columns.
            for (size, columns, field) in [
                (
                    &mut wire_model.input_size,
                    series.features.len(),
                    "input_size",
                ),
                (
                    &mut wire_model.output_size,
                    series.targets.len(),
                    "output_size",
                ),
            ] {
                if *size == 0 {
                    *size = columns as u32;
                } else if *size as usize != columns {
                    return Err(invalid(
                        &format!("model.{field}"),
                        format!("is {size}, the series names {columns} columns for it"),
                    ));
                }
            }
        }
        let model = ModelConfig::try_from(&wire_model)
            .map_err(|e| Error::InvalidArgument(format!("model: {e}")))?;
        let params = model.layout().total();
        if params > limits.max_params {
            return Err(invalid(
                "model",
                format!(
                    "has {params} parameters, above the limit of {}",
                    limits.max_params
                ),
            ));
        }
        let defaults = TrainConfig::default();
        let batch_size = match s.batch_size {
            None => defaults.batch_size,
            Some(0) => return Err(invalid("batch_size", "must be at least 1")),
            Some(b) => b as usize,
        };
        if batch_size > limits.max_batch {
            return Err(invalid(
                "batch_size",
                format!("{batch_size} is above the limit of {}", limits.max_batch),
            ));
        }
        let normalization = pb::Normalization::try_from(s.normalization).map_err(|_| {
            invalid(
                "normalization",
                format!("{} is not a known normalization", s.normalization),
            )
        })?;
        let scale = if normalization == pb::Normalization::Standard
            || (normalization == pb::Normalization::Unspecified
                && series.is_some()
                && s.scale.is_none()
                && !s.scale_auto)
        {
            Scale::Standard
        } else if normalization == pb::Normalization::Minmax {
            Scale::MinMax
        } else if s.scale_auto {
            Scale::Auto
        } else {
            match s.scale {
                None => Scale::default(),
                Some(v) if v.is_finite() && v > 0.0 => Scale::Fixed(v),
                Some(v) => {
                    return Err(invalid(
                        "scale",
                        format!("must be a positive number, got {v}"),
                    ));
                }
            }
        };
        if let Some(t) = s.target_accuracy
            && !(t.is_finite() && t <= 1.0)
        {
            return Err(invalid(
                "target_accuracy",
                format!("must be a number up to 1, got {t}"),
            ));
        }
        let split = if s.train_percent == 0 && s.validation_percent == 0 {
            SplitFractions::default()
        } else {
            SplitFractions {
                train: s.train_percent,
                validation: s.validation_percent,
            }
        };
        if split.train == 0 || split.validation == 0 || split.train + split.validation >= 100 {
            return Err(invalid(
                "train_percent/validation_percent",
                format!(
                    "{}/{} must both be positive and leave a test split",
                    split.train, split.validation
                ),
            ));
        }
        let labelled = series.as_ref().is_some_and(|s| s.label.is_some());
        let loss = match pb::Loss::try_from(s.loss) {
            Ok(pb::Loss::Unspecified) if labelled => Loss::Bce,
            Ok(pb::Loss::Unspecified | pb::Loss::Mse) => Loss::Mse,
            Ok(pb::Loss::Bce) => Loss::Bce,
            Err(_) => return Err(invalid("loss", format!("{} is not a known loss", s.loss))),
        };
        if labelled && loss != Loss::Bce {
            return Err(invalid(
                "loss",
                "must be BCE for a series with a label rule (its targets are 0/1 labels)",
            ));
        }
        let train = TrainConfig {
            loss,
            model,
            optimizer: optimizer(s.optimizer.as_ref())?,
            schedule: schedule(s.schedule.as_ref())?,
            batch_size,
            max_epochs: if s.max_epochs == 0 {
                defaults.max_epochs
            } else {
                s.max_epochs
            },
            patience: if s.patience == 0 {
                defaults.patience
            } else {
                s.patience
            },
            target_accuracy: s.target_accuracy,
            seed: s.seed,
            scale,
            split,
            dropout: s.dropout,
            stateful: stateful_streams(s, series.as_ref(), &model, limits.max_batch)?,
        };
        train
            .validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(Self {
            name: s.name.chars().take(200).collect(),
            dataset,
            train,
            max_steps: (s.max_steps > 0).then_some(s.max_steps),
            checkpoint_every: u64::from(s.checkpoint_every.max(1)),
            init_from: match s.init_from.as_str() {
                "" => None,
                id if id.len() > 200 || id.chars().any(|c| c.is_control()) => {
                    return Err(invalid("init_from", "is not a job id"));
                }
                id => Some(JobId(id.to_string())),
            },
            series,
        })
    }

    /// The wire form, with every default filled in.
    pub fn to_proto(&self) -> pb::JobSpec {
        let t = &self.train;
        pb::JobSpec {
            name: self.name.clone(),
            dataset_id: self.dataset.0.clone(),
            model: Some((&t.model).into()),
            optimizer: Some(optimizer_to_proto(&t.optimizer)),
            schedule: Some(schedule_to_proto(&t.schedule)),
            batch_size: Some(t.batch_size as u32),
            max_epochs: t.max_epochs,
            patience: t.patience,
            target_accuracy: t.target_accuracy,
            seed: t.seed,
            scale: match t.scale {
                Scale::Fixed(v) => Some(v),
                Scale::Auto | Scale::Standard | Scale::MinMax => None,
            },
            scale_auto: t.scale == Scale::Auto,
            normalization: match t.scale {
                Scale::Fixed(_) | Scale::Auto => pb::Normalization::Fixed,
                Scale::Standard => pb::Normalization::Standard,
                Scale::MinMax => pb::Normalization::Minmax,
            } as i32,
            series: self.series.as_ref().map(|s| series_to_proto(s, t.stateful)),
            loss: pb::Loss::from(t.loss) as i32,
            dropout: t.dropout,
            train_percent: t.split.train,
            validation_percent: t.split.validation,
            max_steps: self.max_steps.unwrap_or(0),
            checkpoint_every: self.checkpoint_every as u32,
            init_from: self
                .init_from
                .as_ref()
                .map_or_else(String::new, |j| j.0.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SpecLimits = SpecLimits {
        max_params: 100_000,
        max_batch: 10_000,
    };

    fn base() -> pb::JobSpec {
        pb::JobSpec {
            dataset_id: "a".repeat(64),
            ..Default::default()
        }
    }

    #[test]
    fn stateful_jobs_need_consecutive_every_step_windows_and_bounded_states() {
        let stateful = |change: fn(&mut pb::SeriesSpec), model: pb::ModelConfig| pb::JobSpec {
            model: Some(model),
            series: Some({
                let mut series = pb::SeriesSpec {
                    features: vec!["a".into()],
                    targets: vec!["a".into()],
                    window: 5,
                    stride: 5,
                    every_step: true,
                    stateful: 3,
                    ..Default::default()
                };
                change(&mut series);
                series
            }),
            ..base()
        };
        let lstm = pb::ModelConfig {
            kind: pb::ModelKind::Lstm as i32,
            hidden_size: 8,
            num_layers: 2,
            ..Default::default()
        };
        let spec = JobSpec::from_proto(&stateful(|_| {}, lstm.clone()), &LIMITS).unwrap();
        assert_eq!(spec.train.stateful, 3);
        assert_eq!(spec.to_proto().series.map(|s| s.stateful), Some(3));
        assert_eq!(
            JobSpec::from_proto(&spec.to_proto(), &LIMITS).unwrap(),
            spec
        );
        let big = pb::ModelConfig {
            hidden_size: 256,
            ..lstm.clone()
        };
        for (job, wanted) in [
            (
                stateful(|s| s.every_step = false, lstm.clone()),
                "series.stateful needs every_step",
            ),
            (
                stateful(|s| s.stride = 1, lstm.clone()),
                "got window 5 and stride 1",
            ),
            (
                stateful(
                    |_| {},
                    pb::ModelConfig {
                        bidirectional: true,
                        ..lstm.clone()
                    },
                ),
                "series.stateful needs a unidirectional model",
            ),
            (
                stateful(|s| s.stateful = 10_001, lstm.clone()),
                "10001 streams (rows per step) is above the batch limit of 10000",
            ),
            (
                stateful(|s| s.stateful = 5_000, big),
                "5000 streams of 1024 state values each make 20480000 bytes of state a step",
            ),
        ] {
            // Room for the large model, so that its states are what is refused.
            let roomy = SpecLimits {
                max_params: 1 << 24,
                ..LIMITS
            };
            let err = JobSpec::from_proto(&job, &roomy).unwrap_err().to_string();
            assert!(err.contains(wanted), "`{err}` lacks `{wanted}`");
        }
    }

    #[test]
    fn defaults_and_round_trip() {
        let spec = JobSpec::from_proto(&base(), &LIMITS).unwrap();
        assert_eq!(spec.train, TrainConfig::default());
        assert_eq!(
            JobSpec::from_proto(&spec.to_proto(), &LIMITS).unwrap(),
            spec
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(pb::JobSpec, &str)> = vec![
            (
                pb::JobSpec {
                    dataset_id: "nope".into(),
                    ..base()
                },
                "dataset_id",
            ),
            (
                pb::JobSpec {
                    model: Some(pb::ModelConfig {
                        kind: 1,
                        input_size: 1,
                        hidden_size: 0,
                        num_layers: 1,
                        bidirectional: false,
                        output_size: 1,
                        head: Default::default(),
                    }),
                    ..base()
                },
                "hidden_size",
            ),
            (
                pb::JobSpec {
                    model: Some(pb::ModelConfig {
                        kind: 9,
                        input_size: 1,
                        hidden_size: 8,
                        num_layers: 1,
                        bidirectional: false,
                        output_size: 1,
                        head: Default::default(),
                    }),
                    ..base()
                },
                "kind",
            ),
            (
                pb::JobSpec {
                    model: Some(pb::ModelConfig {
                        kind: 3,
                        input_size: 1,
                        hidden_size: 1000,
                        num_layers: 4,
                        bidirectional: false,
                        output_size: 1,
                        head: Default::default(),
                    }),
                    ..base()
                },
                "parameters, above the limit",
            ),
            (
                pb::JobSpec {
                    optimizer: Some(pb::OptimizerSpec {
                        lr: Some(f64::NAN),
                        ..Default::default()
                    }),
                    ..base()
                },
                "lr",
            ),
            (
                pb::JobSpec {
                    optimizer: Some(pb::OptimizerSpec {
                        lr: Some(-1.0),
                        ..Default::default()
                    }),
                    ..base()
                },
                "lr",
            ),
            (
                pb::JobSpec {
                    batch_size: Some(1_000_000),
                    ..base()
                },
                "batch_size",
            ),
            (
                pb::JobSpec {
                    batch_size: Some(0),
                    ..base()
                },
                "batch_size must be at least 1",
            ),
            (
                pb::JobSpec {
                    scale: Some(0.0),
                    ..base()
                },
                "scale",
            ),
            (
                pb::JobSpec {
                    train_percent: 90,
                    validation_percent: 10,
                    ..base()
                },
                "train_percent",
            ),
        ];
        for (spec, field) in cases {
            let err = JobSpec::from_proto(&spec, &LIMITS).unwrap_err().to_string();
            assert!(err.contains(field), "`{err}` should name {field}");
        }
    }
}
