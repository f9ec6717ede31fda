//! The one error type of `recur-core`.

use std::path::PathBuf;

use crate::data::CsvErrors;

/// Everything that can go wrong in `recur-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    /// A model configuration is out of range.
    #[error("invalid model config: {field} {problem}")]
    InvalidConfig {
        /// The offending field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// A training or optimizer setting is out of range.
    #[error("invalid setting: {field} {problem}")]
    InvalidSetting {
        /// The offending setting.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },

    /// A CSV file has one or more bad lines; every line error is listed.
    #[error("{0}")]
    Csv(#[from] CsvErrors),

    /// A sequence handed to a model or predictor is unusable.
    #[error("row {row}: {problem}")]
    BadRow {
        /// Zero-based index of the row in the request or batch.
        row: usize,
        /// What is wrong with it.
        problem: String,
    },

    /// A flat vector does not have the length the model needs.
    #[error("{what} has {got} values, the model needs {expected}")]
    LengthMismatch {
        /// What vector (parameters, gradient, optimizer state).
        what: &'static str,
        /// Values received.
        got: usize,
        /// Values expected.
        expected: usize,
    },

    /// A compute kernel (a fused layer, the head, the loss, a matrix product, the CUDA backend)
    /// was handed shapes that do not fit together, or its device failed.
    #[error("{op}: {problem}")]
    Kernel {
        /// The kernel: `fused layer`, `head`, `squared error`, `matrix product` or `CUDA`.
        op: &'static str,
        /// What does not fit, or what failed.
        problem: String,
    },

    /// A checkpoint is missing a tensor, has a tensor of the wrong shape, or a bad manifest.
    #[error("checkpoint {path}: {problem}")]
    Checkpoint {
        /// The file that was being read or written.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub(crate) fn kernel(op: &'static str, problem: String) -> Self {
        Self::Kernel { op, problem }
    }

    pub(crate) fn setting(field: &'static str, problem: impl Into<String>) -> Self {
        Self::InvalidSetting {
            field,
            problem: problem.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
