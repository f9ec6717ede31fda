//! Recurrent models with PyTorch's math, names and initialisation.

mod config;
mod dropout;
mod packed;
mod params;
pub mod reference;
mod rnn;

pub use config::{HeadLayer, HeadLayers, ModelConfig, ModelKind, ParamEntry, ParamLayout};
pub use dropout::Dropout;
pub use packed::PackedBatch;
pub use params::Params;
pub(crate) use params::check_len;
pub use reference::{ReferenceModel, StatefulForward, StreamState, Streamer};
pub use rnn::{Forward, SeqModel};
