//! The coordinator's error type and its one mapping to gRPC status codes.

use std::path::PathBuf;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or out of range; the message names the field or row.
    #[error("{0}")]
    InvalidArgument(String),
    /// The job, dataset or checkpoint does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the system is not in a state to serve it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A configured limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// An error from recur-core (model, data, checkpoint).
    #[error(transparent)]
    Core(#[from] recur_core::Error),
    /// The job store failed.
    #[error("job store: {0}")]
    Store(#[from] StoreError),
    /// A lock was poisoned by a thread that panicked while holding it.
    #[error("{0} lock poisoned")]
    Poisoned(&'static str),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Why the job store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened.
    #[error("{path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: redb::DatabaseError,
    },
    /// A transaction, table, storage or commit error.
    #[error(transparent)]
    Db(#[from] redb::Error),
    /// A stored record that does not parse.
    #[error("unreadable record: {0}")]
    Record(#[from] serde_json::Error),
    /// A stored history entry or step that does not decode.
    #[error("unreadable entry: {0}")]
    Entry(#[from] prost::DecodeError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => Self::invalid_argument(msg),
            Error::NotFound(_) => Self::not_found(msg),
            Error::FailedPrecondition(_) => Self::failed_precondition(msg),
            Error::ResourceExhausted(_) => Self::resource_exhausted(msg),
            Error::ShuttingDown => Self::unavailable(msg),
            Error::Core(recur_core::Error::Csv(_))
            | Error::Core(recur_core::Error::BadRow { .. })
            | Error::Core(recur_core::Error::InvalidConfig { .. })
            | Error::Core(recur_core::Error::InvalidSetting { .. }) => Self::invalid_argument(msg),
            Error::Core(_) | Error::Store(_) | Error::Poisoned(_) | Error::Io { .. } => {
                Self::internal(msg)
            }
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
