//! The coordinator's configuration: where it keeps data and the limits that keep it safe.

use std::path::PathBuf;
use std::time::Duration;

use recur_core::data::CsvLimits;

use crate::spec::SpecLimits;
use crate::{Error, Result};

/// Everything the coordinator is told at start.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Datasets, the job store and checkpoints live here.
    pub data_dir: PathBuf,
    /// A worker not heard from for this long is dropped.
    pub heartbeat_timeout: Duration,
    /// A running job left without any worker for this long fails.
    pub no_worker_grace: Duration,
    /// TLS for both services (rustls); `None` serves plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Limits on uploaded CSV files (bytes, rows, row length, value range).
    pub csv: CsvLimits,
    /// Uploads in progress at once.
    pub max_concurrent_uploads: usize,
    /// Jobs waiting in the queue.
    pub max_queued_jobs: usize,
    /// Limits on job specs (parameters, batch size).
    pub spec: SpecLimits,
    /// Largest gRPC message accepted or sent (shards and parameters travel in messages).
    pub max_message_bytes: usize,
    /// Sequences in one `Predict` request.
    pub max_predict_rows: usize,
    /// Values in one `Predict` sequence.
    pub max_predict_len: usize,
    /// Bearer token clients must present, if set.
    pub client_token: Option<crate::auth::Secret>,
    /// Bearer token workers must present, if set.
    pub worker_token: Option<crate::auth::Secret>,
    /// Every worker holds a job's whole training split when it has at most this many values,
    /// so each step is split exactly by the workers' measured speeds; a larger split is sharded
    /// (each worker holds a part sized to its speed, and steps follow the rows' owners).
    pub replicate_values: usize,
    /// The least time a worker gets for a part of a step or evaluation (all it gets while its
    /// speed is unknown); otherwise ten times what its measured speed predicts. A worker that
    /// misses it is dropped and its part reissued.
    pub part_deadline_floor: Duration,
    /// Checkpoint sets kept per role (latest, best) for each job, at least 1; the sets the
    /// job's pointers name are always kept.
    pub keep_checkpoints: usize,
    /// For tests: every store and checkpoint write takes this much longer, as on a slow disk.
    /// Zero in normal use.
    pub write_delay: Duration,
    /// Most `PredictStream` sessions open at once.
    pub max_stream_sessions: usize,
    /// A `PredictStream` session without a stream for this long is closed.
    pub stream_idle: Duration,
}

impl CoordinatorConfig {
    /// Defaults for a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            heartbeat_timeout: Duration::from_secs(3),
            no_worker_grace: Duration::from_secs(600),
            tls: None,
            csv: CsvLimits {
                max_bytes: 64 << 20,
                ..CsvLimits::default()
            },
            max_concurrent_uploads: 4,
            max_queued_jobs: 100,
            spec: SpecLimits {
                max_params: 10_000_000,
                max_batch: 65_536,
            },
            max_message_bytes: 64 << 20,
            max_predict_rows: 10_000,
            max_predict_len: 4096,
            client_token: None,
            worker_token: None,
            replicate_values: crate::scheduler::SchedulerConfig::default().replicate_values,
            part_deadline_floor: crate::scheduler::SchedulerConfig::default().deadline_floor,
            keep_checkpoints: 3,
            write_delay: Duration::ZERO,
            max_stream_sessions: 1024,
            stream_idle: Duration::from_secs(600),
        }
    }

    /// Checks the values, naming the first that is unusable.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| {
            Err(Error::InvalidArgument(format!(
                "coordinator config: {what}"
            )))
        };
        if self.heartbeat_timeout.is_zero() {
            return bad("heartbeat timeout must be above 0");
        }
        if self.part_deadline_floor.is_zero() {
            return bad("part deadline must be above 0");
        }
        if self.csv.max_bytes == 0 || self.csv.max_rows == 0 || self.csv.max_row_len < 2 {
            return bad("upload limits must allow at least one row of two values");
        }
        if self.max_concurrent_uploads == 0
            || self.max_queued_jobs == 0
            || self.max_predict_rows == 0
        {
            return bad("upload, queue and prediction limits must be at least 1");
        }
        if self.keep_checkpoints == 0 {
            return bad("keep at least 1 checkpoint set");
        }
        if self.max_stream_sessions == 0 {
            return bad("allow at least 1 stream session");
        }
        if self.max_message_bytes < 1 << 20 {
            return bad("max message size must be at least 1 MiB");
        }
        Ok(())
    }
}
