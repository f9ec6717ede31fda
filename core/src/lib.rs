//! recur-core: the models, data pipeline, metrics, optimizers, checkpoints and single-process
//! trainer that the recur cluster is built on. No servers live here.
//!
//! - [`model`]: RNN (tanh/relu), LSTM and GRU with PyTorch's math, names and initialisation,
//!   exact on variable-length batches.
//! - [`fused`]: the compute engine under the models: one candle op per layer and direction,
//!   with hand-written backward passes and vectorised activations, on CPU and CUDA.
//! - [`data`]: the CSV reader, the ball-data generator, normalisation, splits, shards, batches.
//! - [`metrics`]: the tutorial's accuracy, MSE, MAE and exact-integer share.
//! - [`optim`]: SGD, Adam, AdamW, Adadelta on flat vectors, and learning-rate schedules.
//! - [`checkpoint`]: safetensors + JSON manifest, written atomically.
//! - [`sets`]: a job's checkpoints as one directory per saved set with atomic role pointers.
//! - [`step`] and [`train`]: one batch's gradient, and the whole training loop.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod checkpoint;
pub mod convert;
pub mod data;
mod error;
pub mod fused;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod sets;
pub mod step;
pub mod stop;
pub mod train;

pub use error::{Error, Result};
