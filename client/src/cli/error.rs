//! The CLI's error: one line, a hint, and an exit code.

use crate::ClientError;

/// A failed command: one line, a hint, and the exit code.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong (may span lines when a file has several bad lines).
    pub message: String,
    /// What to do about it; empty for none.
    pub hint: String,
    /// The process exit code.
    pub code: i32,
}

/// Exit codes scripts can rely on (clap exits 2 for a usage error).
pub mod exit {
    /// The command failed, or the job it followed failed.
    pub const FAILED: i32 = 1;
    /// The command line makes no sense (as clap's own usage errors).
    pub const USAGE: i32 = 2;
    /// The job the command followed was cancelled.
    pub const CANCELLED: i32 = 3;
    /// Interrupted by Ctrl-C (128 + SIGINT); a followed job keeps running.
    pub const INTERRUPTED: i32 = 130;
}

impl CliError {
    /// An error with a hint, exit code 1.
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: hint.into(),
            code: exit::FAILED,
        }
    }

    /// The same error with another exit code.
    pub fn with_code(self, code: i32) -> Self {
        Self { code, ..self }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::Unreachable { .. } => Self::new(
                e.to_string(),
                "start a cluster with `recur local`, or point --coordinator (RECUR_COORDINATOR) at one",
            ),
            ClientError::Status(s) => {
                let hint = match s.code() {
                    tonic::Code::NotFound => "`recur jobs` lists the jobs",
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                        "pass the coordinator's client token with --token or RECUR_CLIENT_TOKEN"
                    }
                    tonic::Code::Unavailable => {
                        "is the coordinator running? `recur local` starts one"
                    }
                    _ => "",
                };
                Self::new(e.to_string(), hint)
            }
            ClientError::BadToken => Self::new(e.to_string(), "use a token of printable ASCII"),
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        Self::new(e.to_string(), "")
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
