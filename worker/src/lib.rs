//! recur-worker: dials a coordinator, joins, and answers its commands (load a shard, compute a
//! step's gradient sum, evaluate) with candle. A worker holds nothing the coordinator cannot
//! rebuild; it reconnects with backoff when the coordinator goes away.

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod device;
mod executor;
mod metrics;
mod session;
mod signal;
mod tls;

pub use device::DeviceSpec;
pub use executor::Executor;
pub use metrics::{WorkerMetrics, serve_metrics};
pub use session::{WorkerConfig, run};
pub use signal::shutdown_signal;
pub use tls::client_tls;

/// The worker protocol version this build speaks (the coordinator's must match).
pub const PROTOCOL_VERSION: u32 = 4;

/// Everything that can go wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator sent something this worker cannot use.
    #[error("protocol: {0}")]
    Protocol(String),
    /// recur-core failed (model, data).
    #[error(transparent)]
    Core(#[from] recur_core::Error),
    /// candle failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The device cannot be used.
    #[error("device `{device}`: {problem}")]
    Device {
        /// As given.
        device: String,
        /// What is wrong.
        problem: String,
    },
    /// The coordinator refused this worker for good (for example a protocol mismatch).
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    /// A TLS file is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The coordinator address is unusable.
    #[error("coordinator address `{address}`: {problem}")]
    Address {
        /// As given.
        address: String,
        /// What is wrong.
        problem: String,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
