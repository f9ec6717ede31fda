//! The client-facing `recur.v1.Recur` service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use recur_core::checkpoint::Checkpoint;
use recur_core::sets::{CheckpointSets, Role};
use recur_proto::v1 as pb;
use recur_proto::v1::recur_server::Recur;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Event, Shared, now_ms};
use crate::Error;
use crate::datasets::{Checked, Layout};
use crate::ids::{DatasetId, JobId};
use crate::scheduler::{JobState, NewJob};
use crate::spec::JobSpec;
use crate::store::{DatasetMeta, JobRecord};

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Size of the checkpoint chunks streamed by `GetCheckpoint`.
const CHUNK: usize = 1 << 20;

/// Implements `recur.v1.Recur`.
#[derive(Debug, Clone)]
pub struct ClientService {
    pub(crate) shared: Arc<Shared>,
}

fn job_id(s: &str) -> Result<JobId, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument("job_id is empty"));
    }
    Ok(JobId(s.to_string()))
}

impl ClientService {
    fn record(&self, id: &JobId) -> Result<JobRecord, Status> {
        self.shared
            .store
            .job(id)?
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    fn info(&self, record: &JobRecord) -> Result<pb::JobInfo, Status> {
        let last = self.shared.store.last_epoch(&record.id)?;
        Ok(record.to_proto(last))
    }

    async fn receive_upload(
        &self,
        mut stream: Streaming<pb::UploadDatasetRequest>,
    ) -> Result<pb::UploadDatasetResponse, Status> {
        use pb::upload_dataset_request::Kind;
        let limit = self.shared.config.csv.max_bytes;
        let header = match stream.message().await? {
            Some(pb::UploadDatasetRequest {
                kind: Some(Kind::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first upload message must be a header",
                ));
            }
            None => return Err(Status::invalid_argument("the upload stream is empty")),
        };
        let name = if header.name.is_empty() {
            "upload.csv".to_string()
        } else {
            header.name.chars().take(200).collect()
        };
        if header.total_bytes as usize > limit {
            return Err(Status::resource_exhausted(format!(
                "{name}: {} bytes is above the upload limit of {limit} bytes",
                header.total_bytes
            )));
        }
        let mut bytes = Vec::with_capacity(header.total_bytes as usize);
        let sha = loop {
            match stream.message().await? {
                Some(pb::UploadDatasetRequest {
                    kind: Some(Kind::Chunk(c)),
                }) => {
                    if c.offset != bytes.len() as u64 {
                        return Err(Status::invalid_argument(format!(
                            "{name}: chunk at offset {}, expected offset {}",
                            c.offset,
                            bytes.len()
                        )));
                    }
                    if bytes.len() + c.data.len() > header.total_bytes as usize {
                        return Err(Status::invalid_argument(format!(
                            "{name}: more bytes than the {} announced in the header",
                            header.total_bytes
                        )));
                    }
                    bytes.extend_from_slice(&c.data);
                }
                Some(pb::UploadDatasetRequest {
                    kind: Some(Kind::Finish(f)),
                }) => break f.sha256,
                Some(_) => {
                    return Err(Status::invalid_argument(format!(
                        "{name}: a second header or an empty message"
                    )));
                }
                None => {
                    return Err(Status::invalid_argument(format!(
                        "{name}: the upload stopped after {} of {} bytes without a finish message",
                        bytes.len(),
                        header.total_bytes
                    )));
                }
            }
        };
        if bytes.len() as u64 != header.total_bytes {
            return Err(Status::invalid_argument(format!(
                "{name}: received {} bytes, the header announced {}",
                bytes.len(),
                header.total_bytes
            )));
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != sha.to_ascii_lowercase() {
            return Err(Status::invalid_argument(format!(
                "{name}: sha256 mismatch: the client sent {sha}, the bytes hash to {digest}"
            )));
        }
        let id = DatasetId(digest);
        let layout = Layout::from_proto(header.layout)?;
        let _gate = self.shared.datasets_gate.read().await;
        if let Some(old) = self.shared.store.dataset(&id)?
            && old.layout != layout
        {
            return Err(already_uploaded_as(&name, &id, old.layout, layout));
        }
        let shared = self.shared.clone();
        let stored_id = id.clone();
        let checked = tokio::task::spawn_blocking(move || {
            shared
                .datasets
                .store(&stored_id, &name, &bytes, layout)
                .map(|d| (d, name))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let (checked, name) = checked;
        let meta = match checked {
            Checked::Rows(data) => {
                let stats = data.stats();
                DatasetMeta {
                    name,
                    rows: stats.rows as u64,
                    min_len: stats.min_len as u64,
                    max_len: stats.max_len as u64,
                    mean_len: stats.mean_len,
                    max_abs: stats.max_abs,
                    bytes: header.total_bytes,
                    uploaded_ms: now_ms(),
                    layout,
                    columns: Vec::new(),
                }
            }
            Checked::Series(info) => DatasetMeta {
                name,
                rows: info.steps as u64,
                min_len: info.columns.len() as u64,
                max_len: info.columns.len() as u64,
                mean_len: info.columns.len() as f64,
                max_abs: info.max_abs,
                bytes: header.total_bytes,
                uploaded_ms: now_ms(),
                layout,
                columns: info.columns,
            },
        };
        // Checked again where it is written: another upload of these bytes as the other layout
        // may have landed since the check above.
        if let Some(old) = self.shared.store.put_dataset(&id, &meta)? {
            if layout == Layout::Rows {
                self.shared.datasets.forget_parsed(&id);
            }
            return Err(already_uploaded_as(&meta.name, &id, old, layout));
        }
        tracing::info!(dataset = %id, rows = meta.rows, layout = layout.as_str(), "dataset uploaded");
        Ok(pb::UploadDatasetResponse {
            dataset_id: id.0,
            stats: Some(dataset_stats(&meta)),
        })
    }

    /// A dataset as listed, with the jobs (newest first) of `jobs` that use it.
    fn dataset_info(id: &DatasetId, meta: &DatasetMeta, jobs: &[JobRecord]) -> pb::DatasetInfo {
        pb::DatasetInfo {
            id: id.0.clone(),
            name: meta.name.clone(),
            stats: Some(dataset_stats(meta)),
            uploaded_unix_ms: meta.uploaded_ms,
            job_ids: jobs
                .iter()
                .filter(|j| &j.spec.dataset == id)
                .map(|j| j.id.0.clone())
                .collect(),
        }
    }

    /// For a fine-tuning spec (`init_from`): the other job's best parameters, after filling in
    /// its model when the spec has none and checking the models match.
    async fn init_params(&self, wire: &mut pb::JobSpec) -> Result<Option<Checkpoint>, Status> {
        if wire.init_from.is_empty() {
            return Ok(None);
        }
        let from = job_id(&wire.init_from)?;
        if self.shared.store.job(&from)?.is_none() {
            return Err(Status::not_found(format!("init_from: no job {from}")));
        }
        let sets = CheckpointSets::new(self.shared.jobs_dir().join(&from.0));
        let loaded = tokio::task::spawn_blocking(move || sets.load_current(Role::Best))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        // A job deleted meanwhile is not found, whatever its vanishing files made the load say.
        if self.shared.store.job(&from)?.is_none() {
            return Err(Status::not_found(format!("init_from: no job {from}")));
        }
        let Some((_, checkpoint)) = loaded.map_err(Error::from)? else {
            return Err(Status::failed_precondition(format!(
                "init_from: {from} has no best checkpoint yet"
            )));
        };
        let theirs = &checkpoint.manifest.model;
        match &wire.model {
            None => wire.model = Some(theirs.into()),
            Some(m) => {
                let ours = recur_core::model::ModelConfig::try_from(m)
                    .map_err(|e| Status::invalid_argument(format!("model: {e}")))?;
                if &ours != theirs {
                    return Err(Status::invalid_argument(format!(
                        "init_from: {from}'s model is {theirs}, this job's is {ours}; leave the model unset to take {from}'s"
                    )));
                }
            }
        }
        Ok(Some(checkpoint))
    }
}

fn dataset_stats(meta: &DatasetMeta) -> pb::DatasetStats {
    pb::DatasetStats {
        rows: meta.rows,
        min_len: meta.min_len,
        max_len: meta.max_len,
        mean_len: meta.mean_len,
        layout: meta.layout.to_proto() as i32,
        columns: meta.columns.clone(),
        max_abs: meta.max_abs,
        bytes: meta.bytes,
    }
}

#[tonic::async_trait]
impl Recur for ClientService {
    #[tracing::instrument(skip_all)]
    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::UploadDatasetResponse>, Status> {
        let _permit = self.shared.uploads.try_acquire().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} uploads are already in progress, the limit",
                self.shared.config.max_concurrent_uploads
            ))
        })?;
        self.receive_upload(request.into_inner())
            .await
            .map(Response::new)
    }

    #[tracing::instrument(skip_all)]
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let mut wire = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let init = self.init_params(&mut wire).await?;
        let spec = JobSpec::from_proto(&wire, &self.shared.config.spec)?;
        // Held until the job is recorded: its dataset is not deleted meanwhile.
        let _gate = self.shared.datasets_gate.read().await;
        let Some(meta) = self.shared.store.dataset(&spec.dataset)? else {
            return Err(Status::not_found(format!(
                "dataset {} not found; upload it first",
                spec.dataset
            )));
        };
        let queued = self
            .shared
            .store
            .jobs()?
            .iter()
            .filter(|j| j.state == JobState::Queued)
            .count();
        if queued >= self.shared.config.max_queued_jobs {
            return Err(Status::resource_exhausted(format!(
                "{queued} jobs are queued, the limit; wait or cancel some"
            )));
        }
        let shared = self.shared.clone();
        let checked = spec.clone();
        let data = tokio::task::spawn_blocking(move || {
            shared.datasets.prepare(&checked, meta.layout, &meta.name)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let data = Arc::new(data);
        let id = self.shared.store.next_job_id()?;
        if let Some(checkpoint) = &init {
            // The job's own copy: it starts (or starts over, after a restart) from it even if
            // the other job is deleted.
            let (dir, checkpoint) = (self.shared.jobs_dir().join(&id.0), checkpoint.clone());
            tokio::task::spawn_blocking(move || checkpoint.save(&dir, crate::server::INIT_STEM))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Error::from)?;
        }
        let record = JobRecord::new(id.clone(), spec.clone(), now_ms());
        if let Err(e) = self.shared.store.put_job(&record) {
            // No record: nothing will ever use the copy.
            let _ = std::fs::remove_dir_all(self.shared.jobs_dir().join(&id.0));
            return Err(e.into());
        }
        super::job_metrics(&self.shared, &record);
        tracing::info!(job = %id, dataset = %spec.dataset, init_from = ?spec.init_from, "job submitted");
        self.shared.send(Event::Submit(Box::new(NewJob {
            id: id.clone(),
            spec,
            data,
            init: init.map(|c| c.params),
            resume: None,
        })))?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.0,
            queue_position: queued as u32,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let id = job_id(&request.into_inner().job_id)?;
        let record = self.record(&id)?;
        Ok(Response::new(self.info(&record)?))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self
            .shared
            .store
            .jobs()?
            .iter()
            .map(|r| self.info(r))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    #[tracing::instrument(skip_all)]
    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let id = job_id(&request.into_inner().job_id)?;
        let record = self.record(&id)?;
        if record.state.is_final() {
            return Err(Status::failed_precondition(format!(
                "{id} has already ended ({:?})",
                record.state
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.shared.send(Event::Cancel(id.clone(), reply))?;
        rx.await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        let record = self.record(&id)?;
        Ok(Response::new(self.info(&record)?))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = job_id(&request.into_inner().job_id)?;
        let last = self.shared.store.last_epoch(&id)?;
        let (reply, rx) = oneshot::channel();
        self.shared.send(Event::Delete(id, reply))?;
        let record = rx
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))??;
        Ok(Response::new(pb::DeleteJobResponse {
            job: Some(record.to_proto(last)),
        }))
    }

    async fn list_datasets(
        &self,
        _: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let jobs = self.shared.store.jobs()?;
        let mut datasets: Vec<pb::DatasetInfo> = self
            .shared
            .store
            .datasets()?
            .iter()
            .map(|(id, meta)| Self::dataset_info(id, meta, &jobs))
            .collect();
        datasets.sort_by(|a, b| {
            b.uploaded_unix_ms
                .cmp(&a.uploaded_unix_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(Response::new(pb::ListDatasetsResponse { datasets }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        let raw = request.into_inner().dataset_id;
        let id = DatasetId::parse(&raw).ok_or_else(|| {
            Status::invalid_argument(format!(
                "dataset_id `{raw}` is not a dataset id (64 hex digits)"
            ))
        })?;
        let _gate = self.shared.datasets_gate.write().await;
        let Some(meta) = self.shared.store.dataset(&id)? else {
            return Err(Status::not_found(format!("no dataset {id}")));
        };
        let jobs = self.shared.store.jobs()?;
        let active: Vec<String> = jobs
            .iter()
            .filter(|j| j.spec.dataset == id && !j.state.is_final())
            .map(|j| format!("{} ({})", j.id, super::state_name(j.state)))
            .collect();
        if !active.is_empty() {
            return Err(Status::failed_precondition(format!(
                "dataset {id} is in use by {}; cancel those jobs first",
                active.join(", ")
            )));
        }
        let info = Self::dataset_info(&id, &meta, &jobs);
        // The record first: once it is gone no job can be submitted on the dataset, and a
        // failure to remove the file leaves only an unlisted file (replaced by a re-upload).
        self.shared.store.delete_dataset(&id)?;
        let shared = self.shared.clone();
        let removed = id.clone();
        let file = tokio::task::spawn_blocking(move || shared.datasets.remove(&removed)).await;
        match file {
            Ok(Ok(())) => tracing::info!(dataset = %id, "dataset deleted"),
            // The dataset is gone already (its record); a file left behind is only disk space,
            // reused by a re-upload of the same bytes.
            Ok(Err(e)) => {
                tracing::error!(dataset = %id, error = %e, "dataset deleted, but its file stays")
            }
            Err(e) => {
                tracing::error!(dataset = %id, error = %e, "dataset deleted, but its file stays")
            }
        }
        Ok(Response::new(pb::DeleteDatasetResponse {
            dataset: Some(info),
        }))
    }

    type WatchJobStream = EventStream<pb::WatchJobResponse>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = job_id(&request.into_inner().job_id)?;
        // Subscribe before reading the history, so nothing falls between the two.
        let mut live = self.shared.watch.subscribe();
        let record = self.record(&id)?;
        let history = self.shared.store.history(&id)?;
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        let mut shutdown = self.shared.shutdown.subscribe();
        tokio::spawn(async move {
            use pb::watch_job_response::Event as E;
            let send = |e: E| {
                let tx = tx.clone();
                async move {
                    tx.send(Ok(pb::WatchJobResponse { event: Some(e) }))
                        .await
                        .is_ok()
                }
            };
            let mut last_epoch = 0;
            for epoch in history {
                last_epoch = epoch.epoch;
                if !send(E::Epoch(epoch)).await {
                    return;
                }
            }
            let last = shared.store.last_epoch(&id).ok().flatten();
            if !send(E::Job(record.to_proto(last))).await || record.state.is_final() {
                return;
            }
            loop {
                let received = tokio::select! {
                    _ = shutdown.recv() => {
                        let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                        return;
                    }
                    received = live.recv() => received,
                };
                match received {
                    Ok(ev) if ev.job == id => {
                        if let E::Epoch(e) = &ev.event {
                            if e.epoch <= last_epoch {
                                continue;
                            }
                            last_epoch = e.epoch;
                        }
                        if !send(ev.event).await || ev.is_final {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Catch up from the store.
                        let Ok(history) = shared.store.history(&id) else {
                            return;
                        };
                        let seen = last_epoch;
                        for epoch in history.into_iter().filter(|e| e.epoch > seen) {
                            last_epoch = epoch.epoch;
                            if !send(E::Epoch(epoch)).await {
                                return;
                            }
                        }
                        if let Ok(Some(r)) = shared.store.job(&id)
                            && r.state.is_final()
                        {
                            let last = shared.store.last_epoch(&id).ok().flatten();
                            let _ = send(E::Job(r.to_proto(last))).await;
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(Status::unavailable("the coordinator is shutting down")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetCheckpointStream = EventStream<pb::GetCheckpointResponse>;

    type PredictStreamStream = EventStream<pb::PredictStreamResponse>;

    #[tracing::instrument(skip_all)]
    async fn predict_stream(
        &self,
        request: Request<Streaming<pb::PredictStreamRequest>>,
    ) -> Result<Response<Self::PredictStreamStream>, Status> {
        use pb::predict_stream_request::Kind;
        use pb::predict_stream_response::Kind as Out;
        let mut incoming = request.into_inner();
        let open = match incoming.message().await? {
            Some(pb::PredictStreamRequest {
                kind: Some(Kind::Open(open)),
            }) => open,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a prediction stream must be `open`",
                ));
            }
            None => return Err(Status::invalid_argument("the prediction stream is empty")),
        };
        let shared = self.shared.clone();
        let (opened, mut state) = if open.session_id.is_empty() {
            let id = job_id(&open.job_id)?;
            self.record(&id)?;
            tokio::task::spawn_blocking(move || shared.sessions.open(&id))
                .await
                .map_err(|e| Status::internal(e.to_string()))??
        } else {
            let resumed = shared.sessions.resume(&open.session_id)?;
            if !open.job_id.is_empty() && open.job_id != resumed.0.job.0 {
                shared.sessions.release(&resumed.0.id, resumed.1);
                return Err(Status::invalid_argument(format!(
                    "stream session {} is on {}, not {}",
                    open.session_id, resumed.0.job, open.job_id
                )));
            }
            resumed
        };
        tracing::debug!(session = %opened.id, job = %opened.job, steps = opened.steps, "stream session held");
        self.shared
            .metrics
            .stream_sessions
            .set(self.shared.sessions.len() as i64);
        let (tx, rx) = mpsc::channel(16);
        let first = pb::PredictStreamResponse {
            kind: Some(Out::Opened(pb::StreamOpened {
                session_id: opened.id.clone(),
                job_id: opened.job.0.clone(),
                epoch: opened.model.epoch,
                input_size: opened.model.input_size() as u32,
                output_size: opened.model.output_size() as u32,
                steps: opened.steps,
            })),
        };
        // One message is held to what one Predict history may hold; a stream silent (or not
        // reading its answers) for longer than the idle time, at least half a minute, is ended
        // so a held session cannot be kept from expiring.
        let max_values = self.shared.config.max_predict_len;
        let outputs = opened.model.output_size().max(1);
        let max_abs = self.shared.config.csv.max_abs_value;
        let patience = self.shared.config.stream_idle.max(Duration::from_secs(30));
        let mut shutdown = self.shared.shutdown.subscribe();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Every way out puts the session back before the stream's last word, so a client that
            // saw the stream end can resume the session at once.
            let ending = if tx.send(Ok(first)).await.is_err() {
                None
            } else {
                loop {
                    let message = tokio::select! {
                        _ = shutdown.recv() => {
                            break Some(Status::unavailable("the coordinator is shutting down"));
                        }
                        m = tokio::time::timeout(patience, incoming.message()) => match m {
                            Ok(m) => m,
                            Err(_) => break Some(Status::deadline_exceeded(format!(
                                "no steps for {} s: the stream is ended, the session kept",
                                patience.as_secs()
                            ))),
                        },
                    };
                    let steps = match message {
                        Ok(Some(pb::PredictStreamRequest {
                            kind: Some(Kind::Steps(steps)),
                        })) => steps,
                        Ok(Some(_)) => {
                            break Some(Status::invalid_argument(
                                "after `open`, a prediction stream carries only `steps`",
                            ));
                        }
                        // The client is done (or gone): the session waits for the next stream.
                        Ok(None) | Err(_) => break None,
                    };
                    if steps.values.len() > max_values {
                        break Some(Status::invalid_argument(format!(
                            "{} values in one message, above the limit of {max_values}",
                            steps.values.len()
                        )));
                    }
                    if let Some(i) = steps
                        .values
                        .iter()
                        .position(|v| !v.is_finite() || f64::from(v.abs()) > max_abs)
                    {
                        break Some(Status::invalid_argument(format!(
                            "value {} ({}) is not a finite number within ±{max_abs}",
                            i + 1,
                            steps.values[i]
                        )));
                    }
                    let model = opened.model.clone();
                    let fed = tokio::task::spawn_blocking(move || {
                        let out = crate::stream::Sessions::feed(&model, &mut state, &steps.values);
                        (out, state)
                    })
                    .await;
                    let (out, back) = match fed {
                        Ok(r) => r,
                        // The state went with the panicked task: the session ends with it.
                        Err(e) => {
                            shared.sessions.close(&opened.id);
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    };
                    state = back;
                    match out {
                        Ok(predictions) => {
                            shared
                                .metrics
                                .stream_steps
                                .inc_by((predictions.len() / outputs) as u64);
                            let reply = pb::PredictStreamResponse {
                                kind: Some(Out::Predictions(pb::StreamPredictions {
                                    predictions,
                                    steps: state.steps(),
                                })),
                            };
                            match tokio::time::timeout(patience, tx.send(Ok(reply))).await {
                                Ok(Ok(())) => {}
                                // Gone, or not reading: the session waits for the next stream.
                                Ok(Err(_)) | Err(_) => break None,
                            }
                        }
                        Err(e) => break Some(Status::from(e)),
                    }
                }
            };
            shared.sessions.release(&opened.id, state);
            shared
                .metrics
                .stream_sessions
                .set(shared.sessions.len() as i64);
            if let Some(status) = ending {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<Self::GetCheckpointStream>, Status> {
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        self.record(&id)?;
        let (role, kind) = if req.kind == pb::CheckpointKind::Latest as i32 {
            (Role::Latest, "latest")
        } else {
            (Role::Best, "best")
        };
        let sets = CheckpointSets::new(self.shared.jobs_dir().join(&id.0));
        let (manifest, bytes) = tokio::task::spawn_blocking(move || sets.read_current(role))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Error::from)?
            .ok_or_else(|| {
                Status::failed_precondition(format!("{id} has no {kind} checkpoint yet"))
            })?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            use pb::get_checkpoint_response::Kind;
            let header = Kind::Header(pb::CheckpointHeader {
                manifest_json: manifest,
                total_bytes: bytes.len() as u64,
            });
            if tx
                .send(Ok(pb::GetCheckpointResponse { kind: Some(header) }))
                .await
                .is_err()
            {
                return;
            }
            for chunk in bytes.chunks(CHUNK) {
                let msg = pb::GetCheckpointResponse {
                    kind: Some(Kind::Chunk(chunk.to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let (reply, rx) = oneshot::channel();
        self.shared.send(Event::Workers(reply))?;
        let workers = rx
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_steps(
        &self,
        request: Request<pb::GetStepsRequest>,
    ) -> Result<Response<pb::GetStepsResponse>, Status> {
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        self.record(&id)?;
        let limit = match req.limit {
            0 => MAX_STEPS_PAGE,
            n => (n as usize).min(MAX_STEPS_PAGE),
        };
        let steps = self.shared.store.steps(&id, req.from_step.max(1), limit)?;
        Ok(Response::new(pb::GetStepsResponse { steps }))
    }

    #[tracing::instrument(skip_all)]
    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let req = request.into_inner();
        let id = job_id(&req.job_id)?;
        let config = &self.shared.config;
        if req.sequences.is_empty() {
            return Err(Status::invalid_argument("no sequences to predict"));
        }
        if req.sequences.len() > config.max_predict_rows {
            return Err(Status::invalid_argument(format!(
                "{} sequences, above the limit of {} per request",
                req.sequences.len(),
                config.max_predict_rows
            )));
        }
        for (row, s) in req.sequences.iter().enumerate() {
            let problem = if s.values.is_empty() {
                Some("is empty; a history needs at least one value".to_string())
            } else if s.values.len() > config.max_predict_len {
                Some(format!(
                    "has {} values, above the limit of {}",
                    s.values.len(),
                    config.max_predict_len
                ))
            } else {
                s.values
                    .iter()
                    .position(|v| !v.is_finite() || v.abs() as f64 > config.csv.max_abs_value)
                    .map(|i| {
                        format!(
                            "value {} ({}) is not a finite number within ±{}",
                            i + 1,
                            s.values[i],
                            config.csv.max_abs_value
                        )
                    })
            };
            if let Some(problem) = problem {
                return Err(Status::invalid_argument(format!(
                    "sequence {row}: {problem}"
                )));
            }
        }
        let record = self.record(&id)?;
        if record.best_validation.is_none() {
            return Err(Status::failed_precondition(format!(
                "{id} has no checkpoint yet (it is {:?})",
                record.state
            )));
        }
        let rows: Vec<Vec<f32>> = req.sequences.into_iter().map(|s| s.values).collect();
        let count = rows.len() as u64;
        let timer = self.shared.metrics.predict_seconds.start_timer();
        let (predictions, epoch) = self.shared.predictor.predict(id, rows).await?;
        timer.observe_duration();
        self.shared.metrics.predicted.inc_by(count);
        Ok(Response::new(pb::PredictResponse { predictions, epoch }))
    }
}

/// The most steps one `GetSteps` reply carries (about 1.5 MiB).
const MAX_STEPS_PAGE: usize = 65_536;

/// The refusal of bytes already uploaded as another layout.
fn already_uploaded_as(name: &str, id: &DatasetId, old: Layout, new: Layout) -> Status {
    Status::already_exists(format!(
        "{name}: these bytes are dataset {id}, uploaded as {}; they cannot also be {}",
        old.as_str(),
        new.as_str()
    ))
}
