//! The typed client.

use recur_proto::transport;
use recur_proto::v1 as pb;
use recur_proto::v1::recur_client::RecurClient;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

/// Where the CLI looks for a coordinator unless told otherwise (the coordinator's default port).
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// Bytes per upload chunk.
const UPLOAD_CHUNK: usize = 1 << 20;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator cannot be reached.
    #[error("cannot reach the coordinator at {address}: {problem}")]
    Unreachable {
        /// The URL tried.
        address: String,
        /// Why.
        problem: String,
    },
    /// The coordinator answered with an error.
    #[error("{}", .0.message())]
    Status(#[from] Status),
    /// The token cannot be sent as a header.
    #[error("the token contains characters a header cannot carry")]
    BadToken,
}

impl ClientError {
    /// The gRPC code, for an error the coordinator returned.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Adds the bearer token to every call.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A connection to a coordinator's client service.
#[derive(Debug, Clone)]
pub struct Client {
    inner: RecurClient<InterceptedService<Channel, BearerToken>>,
    address: String,
}

impl Client {
    /// Connects to `address` (e.g. `http://127.0.0.1:7070`), presenting `token` if given.
    pub async fn connect(address: &str, token: Option<&str>) -> Result<Self> {
        Self::connect_with(address, token, None).await
    }

    /// Connects with TLS settings too (the address must then be `https://`).
    pub async fn connect_with(
        address: &str,
        token: Option<&str>,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Self> {
        let unreachable = |problem: String| ClientError::Unreachable {
            address: address.to_string(),
            problem,
        };
        let mut endpoint =
            Endpoint::from_shared(address.to_string()).map_err(|e| unreachable(e.to_string()))?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| unreachable(e.to_string()))?;
        }
        let endpoint = endpoint
            .tcp_nodelay(true)
            .tcp_keepalive(Some(transport::KEEPALIVE_INTERVAL))
            .initial_stream_window_size(transport::STREAM_WINDOW)
            .initial_connection_window_size(transport::CONNECTION_WINDOW)
            .max_frame_size(transport::MAX_FRAME_SIZE)
            .connect_timeout(std::time::Duration::from_secs(5));
        let channel = endpoint.connect().await.map_err(|e| {
            let mut problem = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                problem = s.to_string();
                source = s.source();
            }
            unreachable(problem)
        })?;
        let token = match token {
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::BadToken)?,
            ),
            None => None,
        };
        Ok(Self {
            inner: RecurClient::with_interceptor(channel, BearerToken(token))
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(64 << 20),
            address: address.to_string(),
        })
    }

    /// The coordinator's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Uploads a CSV file's bytes (one sequence per line); `progress` is called with the bytes
    /// sent so far.
    pub async fn upload(
        &mut self,
        name: &str,
        bytes: Vec<u8>,
        progress: impl FnMut(u64) + Send + 'static,
    ) -> Result<pb::UploadDatasetResponse> {
        self.upload_as(name, bytes, pb::DatasetLayout::Rows, progress)
            .await
    }

    /// Uploads a CSV file's bytes laid out as `layout`.
    pub async fn upload_as(
        &mut self,
        name: &str,
        bytes: Vec<u8>,
        layout: pb::DatasetLayout,
        progress: impl FnMut(u64) + Send + 'static,
    ) -> Result<pb::UploadDatasetResponse> {
        use pb::upload_dataset_request::Kind;
        let sha = hex::encode(Sha256::digest(&bytes));
        let header = pb::UploadDatasetRequest {
            kind: Some(Kind::Header(pb::UploadHeader {
                name: name.to_string(),
                total_bytes: bytes.len() as u64,
                layout: layout as i32,
            })),
        };
        let stream = upload_stream(header, bytes, sha, progress);
        Ok(self.inner.upload_dataset(stream).await?.into_inner())
    }

    /// Queues a job.
    pub async fn submit(&mut self, spec: pb::JobSpec) -> Result<pb::SubmitJobResponse> {
        Ok(self
            .inner
            .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
            .await?
            .into_inner())
    }

    /// Deletes an ended job with its history and checkpoints; returns it as it was.
    pub async fn delete_job(&mut self, id: &str) -> Result<pb::JobInfo> {
        Ok(self
            .inner
            .delete_job(pb::DeleteJobRequest {
                job_id: id.to_string(),
            })
            .await?
            .into_inner()
            .job
            .unwrap_or_default())
    }

    /// The uploaded datasets, newest first.
    pub async fn datasets(&mut self) -> Result<Vec<pb::DatasetInfo>> {
        Ok(self
            .inner
            .list_datasets(pb::ListDatasetsRequest {})
            .await?
            .into_inner()
            .datasets)
    }

    /// Deletes an uploaded dataset no queued or running job uses; returns it as it was.
    pub async fn delete_dataset(&mut self, id: &str) -> Result<pb::DatasetInfo> {
        Ok(self
            .inner
            .delete_dataset(pb::DeleteDatasetRequest {
                dataset_id: id.to_string(),
            })
            .await?
            .into_inner()
            .dataset
            .unwrap_or_default())
    }

    /// A job's state.
    pub async fn job(&mut self, id: &str) -> Result<pb::JobInfo> {
        Ok(self
            .inner
            .get_job(pb::GetJobRequest {
                job_id: id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Every job, newest first.
    pub async fn jobs(&mut self) -> Result<Vec<pb::JobInfo>> {
        Ok(self
            .inner
            .list_jobs(pb::ListJobsRequest {})
            .await?
            .into_inner()
            .jobs)
    }

    /// Cancels a job.
    pub async fn cancel(&mut self, id: &str) -> Result<pb::JobInfo> {
        Ok(self
            .inner
            .cancel_job(pb::CancelJobRequest {
                job_id: id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// A job's events: its history, then live updates until it ends.
    pub async fn watch(&mut self, id: &str) -> Result<Streaming<pb::WatchJobResponse>> {
        Ok(self
            .inner
            .watch_job(pb::WatchJobRequest {
                job_id: id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Downloads a checkpoint: its manifest (JSON) and safetensors bytes.
    pub async fn checkpoint(&mut self, id: &str, latest: bool) -> Result<(String, Vec<u8>)> {
        use pb::get_checkpoint_response::Kind;
        let kind = if latest {
            pb::CheckpointKind::Latest
        } else {
            pb::CheckpointKind::Best
        };
        let mut stream = self
            .inner
            .get_checkpoint(pb::GetCheckpointRequest {
                job_id: id.to_string(),
                kind: kind as i32,
            })
            .await?
            .into_inner();
        let mut manifest = None;
        let mut bytes = Vec::new();
        while let Some(msg) = stream.message().await? {
            match msg.kind {
                Some(Kind::Header(h)) => {
                    bytes.reserve(h.total_bytes as usize);
                    manifest = Some(h.manifest_json);
                }
                Some(Kind::Chunk(c)) => bytes.extend_from_slice(&c),
                None => {}
            }
        }
        let manifest =
            manifest.ok_or_else(|| Status::data_loss("the checkpoint stream had no header"))?;
        Ok((manifest, bytes))
    }

    /// The applied steps of a job's recorded epochs, in order (every page).
    pub async fn steps(&mut self, id: &str) -> Result<Vec<pb::StepRecord>> {
        let mut all: Vec<pb::StepRecord> = Vec::new();
        loop {
            let from_step = all.last().map_or(1, |s| s.step + 1);
            let page = self
                .inner
                .get_steps(pb::GetStepsRequest {
                    job_id: id.to_string(),
                    from_step,
                    limit: 0,
                })
                .await?
                .into_inner()
                .steps;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Connected workers.
    pub async fn workers(&mut self) -> Result<Vec<pb::WorkerInfo>> {
        Ok(self
            .inner
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers)
    }

    /// Predictions for raw histories with a job's best checkpoint.
    pub async fn predict(&mut self, id: &str, rows: Vec<Vec<f32>>) -> Result<pb::PredictResponse> {
        let sequences = rows
            .into_iter()
            .map(|values| pb::Sequence { values })
            .collect();
        Ok(self
            .inner
            .predict(pb::PredictRequest {
                job_id: id.to_string(),
                sequences,
            })
            .await?
            .into_inner())
    }
}

/// An open `PredictStream` session on one stream: feed it steps, get a prediction after each.
/// Dropping it ends the stream; the session stays on the coordinator until it is idle too long
/// and can be continued with [`Client::resume_stream`].
#[derive(Debug)]
pub struct PredictSession {
    requests: tokio::sync::mpsc::Sender<pb::PredictStreamRequest>,
    responses: Streaming<pb::PredictStreamResponse>,
    opened: pb::StreamOpened,
}

impl PredictSession {
    /// What the coordinator said at open: session id, epoch, sizes, steps so far.
    pub fn opened(&self) -> &pb::StreamOpened {
        &self.opened
    }

    /// Feeds one or more raw steps (`input_size` values each); returns `output_size` predictions
    /// per step and the steps fed so far. An error ends this stream (the session is unchanged).
    pub async fn feed(&mut self, values: Vec<f32>) -> Result<pb::StreamPredictions> {
        use pb::predict_stream_request::Kind;
        use pb::predict_stream_response::Kind as Out;
        let sent = self
            .requests
            .send(pb::PredictStreamRequest {
                kind: Some(Kind::Steps(pb::StreamSteps { values })),
            })
            .await;
        match self.responses.message().await? {
            Some(pb::PredictStreamResponse {
                kind: Some(Out::Predictions(p)),
            }) => Ok(p),
            _ if sent.is_err() => Err(Status::unavailable("the prediction stream closed").into()),
            _ => Err(Status::internal("the coordinator answered steps with something else").into()),
        }
    }
}

impl PredictSession {
    /// Ends the stream and waits until the coordinator has put the session back, so it can be
    /// continued at once with [`Client::resume_stream`].
    pub async fn close(self) -> Result<()> {
        let Self {
            requests,
            mut responses,
            ..
        } = self;
        drop(requests);
        while responses.message().await?.is_some() {}
        Ok(())
    }
}

impl Client {
    /// Opens a `PredictStream` session on `job`'s best checkpoint.
    pub async fn open_stream(&mut self, job: &str) -> Result<PredictSession> {
        self.stream_session(pb::StreamOpen {
            job_id: job.to_string(),
            session_id: String::new(),
        })
        .await
    }

    /// Continues a `PredictStream` session on a new stream; with `job`, the coordinator checks
    /// the session is on that job.
    pub async fn resume_stream(
        &mut self,
        session: &str,
        job: Option<&str>,
    ) -> Result<PredictSession> {
        self.stream_session(pb::StreamOpen {
            job_id: job.unwrap_or_default().to_string(),
            session_id: session.to_string(),
        })
        .await
    }

    async fn stream_session(&mut self, open: pb::StreamOpen) -> Result<PredictSession> {
        use pb::predict_stream_request::Kind;
        use pb::predict_stream_response::Kind as Out;
        let (requests, rx) = tokio::sync::mpsc::channel(4);
        requests
            .send(pb::PredictStreamRequest {
                kind: Some(Kind::Open(open)),
            })
            .await
            .map_err(|_| Status::internal("the request channel closed"))?;
        let mut responses = self
            .inner
            .predict_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match responses.message().await? {
            Some(pb::PredictStreamResponse {
                kind: Some(Out::Opened(opened)),
            }) => Ok(PredictSession {
                requests,
                responses,
                opened,
            }),
            _ => Err(Status::internal("the coordinator did not answer `open`").into()),
        }
    }
}

fn upload_stream(
    header: pb::UploadDatasetRequest,
    bytes: Vec<u8>,
    sha: String,
    mut progress: impl FnMut(u64) + Send + 'static,
) -> impl tokio_stream::Stream<Item = pb::UploadDatasetRequest> + Send + 'static {
    use pb::upload_dataset_request::Kind;
    let total = bytes.len();
    let chunks = (0..total.div_ceil(UPLOAD_CHUNK)).map(move |i| {
        let start = i * UPLOAD_CHUNK;
        let end = (start + UPLOAD_CHUNK).min(total);
        progress(end as u64);
        pb::UploadDatasetRequest {
            kind: Some(Kind::Chunk(pb::UploadChunk {
                offset: start as u64,
                data: bytes[start..end].to_vec(),
            })),
        }
    });
    let finish = pb::UploadDatasetRequest {
        kind: Some(Kind::Finish(pb::UploadFinish { sha256: sha })),
    };
    tokio_stream::iter(
        std::iter::once(header)
            .chain(chunks)
            .chain(std::iter::once(finish)),
    )
}
