//! The job store: job records, per-epoch history, the applied steps and dataset metadata in redb
//! (embedded, crash-safe). Values are JSON (records) or protobuf (epoch metrics, steps). An
//! epoch's history and its steps are committed in one transaction, so the steps of every
//! recorded epoch are complete and a resumed job's cut is exact.

use std::path::Path;

use prost::Message;
use recur_core::metrics::Metrics;
use recur_proto::v1 as pb;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::datasets::Layout;
use crate::error::StoreError;
use crate::ids::{DatasetId, JobId};
use crate::scheduler::{JobProgress, JobState};
use crate::spec::JobSpec;
use crate::{Error, Result};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");
const DATASETS: TableDefinition<&str, &[u8]> = TableDefinition::new("datasets");
const STEPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("steps");

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// What it trains.
    pub spec: JobSpec,
    /// Its state.
    pub state: JobState,
    /// Failure reason or a note on the state.
    pub message: String,
    /// Unix milliseconds of submission.
    pub created_ms: u64,
    /// Unix milliseconds of the last change.
    pub updated_ms: u64,
    /// Epochs completed.
    pub epochs: u64,
    /// Steps applied.
    pub steps: u64,
    /// The best epoch.
    pub best_epoch: u64,
    /// Its validation metrics.
    pub best_validation: Option<Metrics>,
    /// Test metrics once completed.
    pub test: Option<Metrics>,
    /// Why training stopped.
    pub stop_reason: Option<String>,
    /// Problems found and worked around (a damaged checkpoint set skipped at resume).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl JobRecord {
    /// A new queued job.
    pub fn new(id: JobId, spec: JobSpec, now_ms: u64) -> Self {
        Self {
            id,
            spec,
            state: JobState::Queued,
            message: String::new(),
            created_ms: now_ms,
            updated_ms: now_ms,
            epochs: 0,
            steps: 0,
            best_epoch: 0,
            best_validation: None,
            test: None,
            stop_reason: None,
            warnings: Vec::new(),
        }
    }

    /// Merges a progress report from the scheduler.
    pub fn apply(&mut self, p: &JobProgress, now_ms: u64) {
        if let Some(state) = p.state {
            self.state = state;
        }
        if let Some(message) = &p.message {
            self.message.clone_from(message);
        }
        // A state-only update (queued) carries zeros; never move progress backwards.
        self.epochs = self.epochs.max(p.epochs);
        self.steps = self.steps.max(p.steps);
        if p.best_validation.is_some() {
            self.best_epoch = p.best_epoch;
            self.best_validation = p.best_validation;
        }
        if p.test.is_some() {
            self.test = p.test;
        }
        if p.stop_reason.is_some() {
            self.stop_reason.clone_from(&p.stop_reason);
        }
        self.updated_ms = now_ms;
    }

    /// The wire form; `last_epoch` from the history.
    pub fn to_proto(&self, last_epoch: Option<pb::EpochMetrics>) -> pb::JobInfo {
        pb::JobInfo {
            id: self.id.0.clone(),
            spec: Some(self.spec.to_proto()),
            state: pb::JobState::from(self.state) as i32,
            message: self.message.clone(),
            created_unix_ms: self.created_ms,
            updated_unix_ms: self.updated_ms,
            epochs: self.epochs,
            steps: self.steps,
            best_epoch: self.best_epoch,
            best_validation: self.best_validation.as_ref().map(pb::Metrics::from),
            test: self.test.as_ref().map(pb::Metrics::from),
            last_epoch,
            stop_reason: self.stop_reason.clone().unwrap_or_default(),
            warnings: self.warnings.clone(),
        }
    }
}

/// What is kept about an uploaded dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    /// The file name given at upload.
    pub name: String,
    /// Rows.
    pub rows: u64,
    /// Shortest row.
    pub min_len: u64,
    /// Longest row.
    pub max_len: u64,
    /// Mean row length.
    pub mean_len: f64,
    /// Largest magnitude.
    pub max_abs: f32,
    /// File size.
    pub bytes: u64,
    /// Unix milliseconds of the last upload (0 for records from before it was kept).
    #[serde(default)]
    pub uploaded_ms: u64,
    /// How the file is laid out (rows for records from before series existed).
    #[serde(default)]
    pub layout: Layout,
    /// A series' header.
    #[serde(default)]
    pub columns: Vec<String>,
}

/// The embedded store.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn err(e: impl Into<redb::Error>) -> Error {
    Error::Store(StoreError::Db(e.into()))
}

fn bad_record(e: serde_json::Error) -> Error {
    Error::Store(StoreError::Record(e))
}

fn bad_entry(e: prost::DecodeError) -> Error {
    Error::Store(StoreError::Entry(e))
}

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|source| {
            Error::Store(StoreError::Open {
                path: path.to_path_buf(),
                source,
            })
        })?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.open_table(JOBS).map_err(err)?;
        tx.open_table(HISTORY).map_err(err)?;
        tx.open_table(DATASETS).map_err(err)?;
        tx.open_table(STEPS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Self { db })
    }

    /// Allocates the next job id.
    pub fn next_job_id(&self) -> Result<JobId> {
        let tx = self.db.begin_write().map_err(err)?;
        let n = {
            let mut meta = tx.open_table(META).map_err(err)?;
            let n = meta.get("jobs").map_err(err)?.map_or(0, |v| v.value()) + 1;
            meta.insert("jobs", n).map_err(err)?;
            n
        };
        tx.commit().map_err(err)?;
        Ok(JobId::nth(n))
    }

    /// Writes a job record.
    pub fn put_job(&self, job: &JobRecord) -> Result<()> {
        let bytes = serde_json::to_vec(job).map_err(bad_record)?;
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(JOBS)
            .map_err(err)?
            .insert(job.id.0.as_str(), bytes.as_slice())
            .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Reads a job record.
    pub fn job(&self, id: &JobId) -> Result<Option<JobRecord>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(JOBS).map_err(err)?;
        let Some(v) = table.get(id.0.as_str()).map_err(err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(bad_record)
    }

    /// Every job record, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(JOBS).map_err(err)?;
        let mut jobs = Vec::new();
        for entry in table.iter().map_err(err)? {
            let (_, v) = entry.map_err(err)?;
            jobs.push(serde_json::from_slice::<JobRecord>(v.value()).map_err(bad_record)?);
        }
        jobs.sort_by_key(|j| std::cmp::Reverse((j.created_ms, job_number(&j.id))));
        Ok(jobs)
    }

    /// Records an epoch of a job and the steps applied in it, in one transaction.
    pub fn append_epoch(
        &self,
        id: &JobId,
        epoch: &pb::EpochMetrics,
        steps: &[pb::StepRecord],
    ) -> Result<()> {
        let bytes = epoch.encode_to_vec();
        let tx = self.db.begin_write().map_err(err)?;
        tx.open_table(HISTORY)
            .map_err(err)?
            .insert((id.0.as_str(), epoch.epoch), bytes.as_slice())
            .map_err(err)?;
        {
            let mut table = tx.open_table(STEPS).map_err(err)?;
            for step in steps {
                table
                    .insert((id.0.as_str(), step.step), step.encode_to_vec().as_slice())
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Up to `limit` recorded steps of a job from step `from`, in order.
    pub fn steps(&self, id: &JobId, from: u64, limit: usize) -> Result<Vec<pb::StepRecord>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(STEPS).map_err(err)?;
        let mut out = Vec::new();
        for entry in table
            .range((id.0.as_str(), from)..=(id.0.as_str(), u64::MAX))
            .map_err(err)?
            .take(limit)
        {
            let (_, v) = entry.map_err(err)?;
            out.push(pb::StepRecord::decode(v.value()).map_err(bad_entry)?);
        }
        Ok(out)
    }

    /// Every epoch of a job, in order.
    pub fn history(&self, id: &JobId) -> Result<Vec<pb::EpochMetrics>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(HISTORY).map_err(err)?;
        let mut out = Vec::new();
        for entry in table
            .range((id.0.as_str(), 0)..=(id.0.as_str(), u64::MAX))
            .map_err(err)?
        {
            let (_, v) = entry.map_err(err)?;
            out.push(pb::EpochMetrics::decode(v.value()).map_err(bad_entry)?);
        }
        Ok(out)
    }

    /// The last epoch of a job.
    pub fn last_epoch(&self, id: &JobId) -> Result<Option<pb::EpochMetrics>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(HISTORY).map_err(err)?;
        let mut range = table
            .range((id.0.as_str(), 0)..=(id.0.as_str(), u64::MAX))
            .map_err(err)?;
        match range.next_back() {
            Some(entry) => {
                let (_, v) = entry.map_err(err)?;
                pb::EpochMetrics::decode(v.value())
                    .map(Some)
                    .map_err(bad_entry)
            }
            None => Ok(None),
        }
    }

    /// Forgets epochs after `epoch` and steps after `step` (a resumed job redoes them), in one
    /// transaction.
    pub fn truncate_history(&self, id: &JobId, epoch: u64, step: u64) -> Result<()> {
        let tx = self.db.begin_write().map_err(err)?;
        for (table, after) in [(HISTORY, epoch), (STEPS, step)] {
            let mut table = tx.open_table(table).map_err(err)?;
            let stale: Vec<u64> = table
                .range((id.0.as_str(), after + 1)..=(id.0.as_str(), u64::MAX))
                .map_err(err)?
                .filter_map(|e| e.ok().map(|(k, _)| k.value().1))
                .collect();
            for key in stale {
                table.remove((id.0.as_str(), key)).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Records a dataset.
    ///
    /// Unless the same bytes are already recorded as another layout: then nothing is written
    /// and that layout is returned. The check and the write are one transaction, so two uploads
    /// of the same bytes as different layouts at once never both land.
    pub fn put_dataset(&self, id: &DatasetId, meta: &DatasetMeta) -> Result<Option<Layout>> {
        let bytes = serde_json::to_vec(meta).map_err(bad_record)?;
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut table = tx.open_table(DATASETS).map_err(err)?;
            let old = match table.get(id.0.as_str()).map_err(err)? {
                Some(v) => Some(
                    serde_json::from_slice::<DatasetMeta>(v.value())
                        .map_err(bad_record)?
                        .layout,
                ),
                None => None,
            };
            if let Some(layout) = old.filter(|&l| l != meta.layout) {
                return Ok(Some(layout));
            }
            table.insert(id.0.as_str(), bytes.as_slice()).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(None)
    }

    /// Every dataset's metadata.
    pub fn datasets(&self) -> Result<Vec<(DatasetId, DatasetMeta)>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(DATASETS).map_err(err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let meta = serde_json::from_slice(v.value()).map_err(bad_record)?;
            out.push((DatasetId(k.value().to_string()), meta));
        }
        Ok(out)
    }

    /// Forgets a dataset; false when it was not recorded.
    pub fn delete_dataset(&self, id: &DatasetId) -> Result<bool> {
        let tx = self.db.begin_write().map_err(err)?;
        let found = tx
            .open_table(DATASETS)
            .map_err(err)?
            .remove(id.0.as_str())
            .map_err(err)?
            .is_some();
        tx.commit().map_err(err)?;
        Ok(found)
    }

    /// Forgets a job: its record, epoch history and steps, in one transaction; false when there
    /// was no such job.
    pub fn delete_job(&self, id: &JobId) -> Result<bool> {
        let tx = self.db.begin_write().map_err(err)?;
        let found = tx
            .open_table(JOBS)
            .map_err(err)?
            .remove(id.0.as_str())
            .map_err(err)?
            .is_some();
        for table in [HISTORY, STEPS] {
            let mut table = tx.open_table(table).map_err(err)?;
            table
                .retain_in((id.0.as_str(), 0)..=(id.0.as_str(), u64::MAX), |_, _| false)
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(found)
    }

    /// A dataset's metadata.
    pub fn dataset(&self, id: &DatasetId) -> Result<Option<DatasetMeta>> {
        let tx = self.db.begin_read().map_err(err)?;
        let table = tx.open_table(DATASETS).map_err(err)?;
        let Some(v) = table.get(id.0.as_str()).map_err(err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(bad_record)
    }
}

fn job_number(id: &JobId) -> u64 {
    id.0.strip_prefix("job-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{JobSpec, SpecLimits};

    #[test]
    fn jobs_and_history_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let spec = JobSpec::from_proto(
            &pb::JobSpec {
                dataset_id: "b".repeat(64),
                ..Default::default()
            },
            &SpecLimits {
                max_params: 1000,
                max_batch: 1000,
            },
        )
        .unwrap();
        {
            let store = Store::open(&path).unwrap();
            let id = store.next_job_id().unwrap();
            assert_eq!(id, JobId::nth(1));
            let mut rec = JobRecord::new(id.clone(), spec.clone(), 5);
            rec.apply(
                &JobProgress {
                    state: Some(JobState::Running),
                    epochs: 2,
                    ..Default::default()
                },
                6,
            );
            store.put_job(&rec).unwrap();
            for e in 1..=3 {
                let steps: Vec<pb::StepRecord> = (1..=2)
                    .map(|k| pb::StepRecord {
                        step: (e - 1) * 2 + k,
                        epoch: e,
                        samples: 10,
                        rows_digest: e,
                    })
                    .collect();
                store
                    .append_epoch(
                        &id,
                        &pb::EpochMetrics {
                            epoch: e,
                            ..Default::default()
                        },
                        &steps,
                    )
                    .unwrap();
            }
            store.truncate_history(&id, 2, 4).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.next_job_id().unwrap(), JobId::nth(2));
        let rec = store.job(&JobId::nth(1)).unwrap().unwrap();
        assert_eq!(
            (rec.state, rec.epochs, rec.updated_ms),
            (JobState::Running, 2, 6)
        );
        let epochs: Vec<u64> = store
            .history(&JobId::nth(1))
            .unwrap()
            .iter()
            .map(|e| e.epoch)
            .collect();
        assert_eq!(epochs, [1, 2]);
        let steps: Vec<(u64, u64)> = store
            .steps(&JobId::nth(1), 0, usize::MAX)
            .unwrap()
            .iter()
            .map(|s| (s.step, s.epoch))
            .collect();
        assert_eq!(steps, [(1, 1), (2, 1), (3, 2), (4, 2)]);
        let page: Vec<u64> = store
            .steps(&JobId::nth(1), 2, 2)
            .unwrap()
            .iter()
            .map(|s| s.step)
            .collect();
        assert_eq!(page, [2, 3]);
        assert!(store.job(&JobId::nth(7)).unwrap().is_none());
    }

    #[test]
    fn deleting_a_job_takes_its_history_and_steps_and_nothing_of_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("jobs.redb")).unwrap();
        let spec = JobSpec::from_proto(
            &pb::JobSpec {
                dataset_id: "c".repeat(64),
                ..Default::default()
            },
            &SpecLimits {
                max_params: 1000,
                max_batch: 1000,
            },
        )
        .unwrap();
        // job-1 and job-10: one id a prefix of the other.
        for n in [1, 10] {
            let id = JobId::nth(n);
            store
                .put_job(&JobRecord::new(id.clone(), spec.clone(), n))
                .unwrap();
            let step = pb::StepRecord {
                step: 1,
                epoch: 1,
                ..Default::default()
            };
            let epoch = pb::EpochMetrics {
                epoch: 1,
                ..Default::default()
            };
            store.append_epoch(&id, &epoch, &[step]).unwrap();
        }
        assert!(store.delete_job(&JobId::nth(1)).unwrap());
        assert!(!store.delete_job(&JobId::nth(1)).unwrap());
        assert!(store.job(&JobId::nth(1)).unwrap().is_none());
        assert!(store.history(&JobId::nth(1)).unwrap().is_empty());
        assert!(store.steps(&JobId::nth(1), 0, 10).unwrap().is_empty());
        assert!(store.job(&JobId::nth(10)).unwrap().is_some());
        assert_eq!(store.history(&JobId::nth(10)).unwrap().len(), 1);
        assert_eq!(store.steps(&JobId::nth(10), 0, 10).unwrap().len(), 1);

        let meta = DatasetMeta {
            name: "a.csv".into(),
            rows: 3,
            min_len: 2,
            max_len: 2,
            mean_len: 2.0,
            max_abs: 1.0,
            bytes: 6,
            uploaded_ms: 9,
            layout: Layout::Series,
            columns: vec!["a".into(), "b".into()],
        };
        let id = DatasetId("d".repeat(64));
        assert_eq!(store.put_dataset(&id, &meta).unwrap(), None);
        assert_eq!(store.datasets().unwrap(), [(id.clone(), meta.clone())]);
        // The same bytes again as a series: recorded anew. As rows: refused, nothing changed.
        assert_eq!(store.put_dataset(&id, &meta).unwrap(), None);
        let rows = DatasetMeta {
            layout: Layout::Rows,
            columns: Vec::new(),
            ..meta.clone()
        };
        assert_eq!(store.put_dataset(&id, &rows).unwrap(), Some(Layout::Series));
        assert_eq!(store.datasets().unwrap(), [(id.clone(), meta)]);
        assert!(store.delete_dataset(&id).unwrap());
        assert!(store.datasets().unwrap().is_empty());
        assert!(!store.delete_dataset(&id).unwrap());
    }
}
