//! Stateful streaming prediction: sessions that each hold one sequence's recurrent state between
//! messages (and between streams), bounded in number and expired when idle.
//!
//! A session pins the checkpoint it opened with: a better checkpoint landing meanwhile does not
//! change the model under a state computed by the old one. While a stream feeds a session its
//! state is taken out of the table, so the lock is never held across a model call and a second
//! stream on the same session is refused rather than interleaved.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::RngCore;
use recur_core::data::Normalizer;
use recur_core::model::{StreamState, Streamer};
use recur_core::sets::{CheckpointSets, Role};
use recur_core::step::Loss;

use crate::ids::JobId;
use crate::{Error, Result};

/// A checkpoint ready to stream.
#[derive(Debug)]
pub struct StreamModel {
    streamer: Streamer,
    norm: Normalizer,
    loss: Loss,
    /// The checkpoint's epoch.
    pub epoch: u64,
}

impl StreamModel {
    /// Values per step.
    pub fn input_size(&self) -> usize {
        self.streamer.config().input_size
    }

    /// Predictions per step.
    pub fn output_size(&self) -> usize {
        self.streamer.config().output_size
    }
}

#[derive(Debug)]
struct Session {
    job: JobId,
    model: Arc<StreamModel>,
    /// `None` while a stream is feeding it.
    state: Option<StreamState>,
    last_used: Instant,
}

/// What a stream learns when it opens or resumes a session.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The session's id.
    pub id: String,
    /// Its job.
    pub job: JobId,
    /// Its model.
    pub model: Arc<StreamModel>,
    /// Steps fed so far.
    pub steps: u64,
}

/// The open sessions.
#[derive(Debug)]
pub struct Sessions {
    jobs_dir: PathBuf,
    max: usize,
    idle: Duration,
    table: Mutex<HashMap<String, Session>>,
    /// Each job's loaded best checkpoint, shared by its sessions while any holds it.
    models: Mutex<HashMap<JobId, Weak<StreamModel>>>,
    /// Jobs deleted since this coordinator started (ids are never reused): an open that was
    /// under way when its job was deleted is refused rather than left holding a session of it.
    /// Locked inside `table` only.
    deleted: Mutex<HashSet<JobId>>,
}

impl Sessions {
    /// Sessions on the checkpoints under `jobs_dir`: at most `max` open, each dropped after
    /// `idle` without a stream on it.
    pub fn new(jobs_dir: PathBuf, max: usize, idle: Duration) -> Self {
        Self {
            jobs_dir,
            max,
            idle,
            table: Mutex::new(HashMap::new()),
            models: Mutex::new(HashMap::new()),
            deleted: Mutex::new(HashSet::new()),
        }
    }

    /// A job has a new best checkpoint: new sessions load it (open ones keep theirs).
    pub fn invalidate(&self, job: &JobId) {
        if let Ok(mut models) = self.models.lock() {
            models.remove(job);
        }
    }

    /// The job's best checkpoint, shared with its other sessions when one still holds it.
    fn model(&self, job: &JobId) -> Result<Arc<StreamModel>> {
        let models = || {
            self.models
                .lock()
                .map_err(|_| Error::Poisoned("stream models"))
        };
        if let Some(model) = models()?.get(job).and_then(Weak::upgrade) {
            return Ok(model);
        }
        let sets = CheckpointSets::new(self.jobs_dir.join(&job.0));
        let Some((_, ckpt)) = sets.load_current(Role::Best)? else {
            return Err(Error::FailedPrecondition(format!(
                "{job} has no checkpoint yet"
            )));
        };
        let params = ckpt.params(&Device::Cpu)?;
        let streamer =
            Streamer::new(&params).map_err(|e| Error::FailedPrecondition(format!("{job}: {e}")))?;
        let model = Arc::new(StreamModel {
            streamer,
            norm: ckpt.manifest.normalizer(),
            loss: ckpt.manifest.loss,
            epoch: ckpt.manifest.epoch,
        });
        models()?.insert(job.clone(), Arc::downgrade(&model));
        Ok(model)
    }

    fn table(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Session>>> {
        self.table
            .lock()
            .map_err(|_| Error::Poisoned("stream sessions"))
    }

    /// Drops idle sessions (not those a stream holds).
    fn sweep(&self, table: &mut HashMap<String, Session>, now: Instant) {
        table.retain(|_, s| s.state.is_none() || now.duration_since(s.last_used) < self.idle);
    }

    /// Opens a session on `job`'s best checkpoint (blocking: reads it from disk). The session is
    /// held by the caller's stream, with the returned state, until [`Sessions::release`].
    pub fn open(&self, job: &JobId) -> Result<(Opened, StreamState)> {
        {
            let mut table = self.table()?;
            self.refuse_deleted(job)?;
            self.sweep(&mut table, Instant::now());
            if table.len() >= self.max {
                return Err(Error::ResourceExhausted(format!(
                    "{} stream sessions are open, the limit (--max-stream-sessions); idle ones \
                     close after {} s",
                    table.len(),
                    self.idle.as_secs()
                )));
            }
        }
        let model = match self.model(job) {
            Ok(model) => model,
            Err(e) => {
                // A delete that moved the checkpoints away meanwhile says so, not "no checkpoint".
                let _table = self.table()?;
                self.refuse_deleted(job)?;
                return Err(e);
            }
        };
        let state = model.streamer.start()?;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        let id = hex::encode(bytes);
        let mut table = self.table()?;
        // The job may have been deleted while its checkpoint loaded.
        self.refuse_deleted(job)?;
        // Counted again: others may have opened meanwhile.
        if table.len() >= self.max {
            return Err(Error::ResourceExhausted(format!(
                "{} stream sessions are open, the limit (--max-stream-sessions)",
                table.len()
            )));
        }
        table.insert(
            id.clone(),
            Session {
                job: job.clone(),
                model: model.clone(),
                state: None,
                last_used: Instant::now(),
            },
        );
        Ok((
            Opened {
                id,
                job: job.clone(),
                model,
                steps: 0,
            },
            state,
        ))
    }

    /// Takes an existing session for the caller's stream.
    pub fn resume(&self, id: &str) -> Result<(Opened, StreamState)> {
        let mut table = self.table()?;
        self.sweep(&mut table, Instant::now());
        let session = table.get_mut(id).ok_or_else(|| {
            Error::NotFound(format!(
                "stream session {id} is unknown or expired (idle sessions close after {} s)",
                self.idle.as_secs()
            ))
        })?;
        let state = session.state.take().ok_or_else(|| {
            Error::FailedPrecondition(format!("stream session {id} is in use by another stream"))
        })?;
        Ok((
            Opened {
                id: id.to_string(),
                job: session.job.clone(),
                model: session.model.clone(),
                steps: state.steps(),
            },
            state,
        ))
    }

    /// Feeds raw steps (finite, as the handler checked) to a held session's state; returns
    /// predictions in the data's terms, `output_size` per step. The state is unchanged when the
    /// steps are refused.
    pub fn feed(model: &StreamModel, state: &mut StreamState, raw: &[f32]) -> Result<Vec<f32>> {
        let n = model.input_size();
        if raw.is_empty() || !raw.len().is_multiple_of(n) {
            return Err(Error::InvalidArgument(format!(
                "{} values are not whole steps: the model takes {n} features per step",
                raw.len()
            )));
        }
        let out = model.streamer.feed(state, &model.norm.inputs(raw))?;
        Ok(model.loss.outputs(&model.norm, &out))
    }

    /// Gives a held session back when its stream ends: it stays open until idle too long.
    pub fn release(&self, id: &str, state: StreamState) {
        if let Ok(mut table) = self.table()
            && let Some(s) = table.get_mut(id)
        {
            s.state = Some(state);
            s.last_used = Instant::now();
        }
    }

    /// Drops a job's sessions (the job was deleted) and refuses new ones, even those already
    /// on their way.
    pub fn forget_job(&self, job: &JobId) {
        if let Ok(mut table) = self.table() {
            if let Ok(mut deleted) = self.deleted.lock() {
                deleted.insert(job.clone());
            }
            table.retain(|_, s| &s.job != job);
        }
        self.invalidate(job);
    }

    fn refuse_deleted(&self, job: &JobId) -> Result<()> {
        let deleted = self
            .deleted
            .lock()
            .map_err(|_| Error::Poisoned("deleted jobs"))?;
        if deleted.contains(job) {
            return Err(Error::NotFound(format!("no job {job} (it was deleted)")));
        }
        Ok(())
    }

    /// Open sessions, held by a stream or idle.
    pub fn len(&self) -> usize {
        self.table().map_or(0, |t| t.len())
    }

    /// Closes a held session whose state was lost.
    pub fn close(&self, id: &str) {
        if let Ok(mut table) = self.table() {
            table.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use recur_core::checkpoint::{Checkpoint, FORMAT_VERSION, Manifest};
    use recur_core::model::{ModelConfig, Params};

    use super::*;

    #[test]
    fn a_deleted_jobs_sessions_go_and_no_new_one_opens_even_with_its_checkpoint_left() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId::nth(1);
        let model = ModelConfig::tutorial();
        let params = Params::init(model, 1, &Device::Cpu)
            .and_then(|p| p.to_flat())
            .unwrap();
        let checkpoint = Checkpoint {
            manifest: Manifest {
                format_version: FORMAT_VERSION,
                model,
                scale: 50.0,
                epoch: 1,
                step: 1,
                validation: None,
                test: None,
                optimizer: None,
                scheduler: None,
                lr: None,
                position: BTreeMap::new(),
                normalizer: None,
                loss: Loss::Mse,
            },
            params,
            optimizer: None,
        };
        CheckpointSets::new(dir.path().join(&job.0))
            .save(Role::Best, &checkpoint, 2)
            .unwrap();
        let sessions = Sessions::new(dir.path().to_path_buf(), 4, Duration::from_secs(60));
        let (opened, state) = sessions.open(&job).unwrap();
        sessions.release(&opened.id, state);
        assert_eq!(sessions.len(), 1);
        // Deleted (its files still there, as when the delete lands while an open is under way).
        sessions.forget_job(&job);
        assert_eq!(sessions.len(), 0);
        let err = sessions.open(&job).unwrap_err().to_string();
        assert!(err.contains("no job job-1 (it was deleted)"), "{err}");
        // Other jobs are not affected.
        CheckpointSets::new(dir.path().join("job-2"))
            .save(Role::Best, &checkpoint, 2)
            .unwrap();
        assert!(sessions.open(&JobId::nth(2)).is_ok());
    }
}
