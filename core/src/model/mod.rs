//! Recurrent models with PyTorch's math, names and initialisation.

mod config;
mod packed;
mod params;
pub mod reference;
mod rnn;

pub use config::{ModelConfig, ModelKind, ParamEntry, ParamLayout};
pub use packed::PackedBatch;
pub use params::Params;
pub(crate) use params::check_len;
pub use reference::{ReferenceModel, StreamState, Streamer};
pub use rnn::{Forward, SeqModel};
