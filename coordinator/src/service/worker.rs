//! The worker-facing `recur.v1.Workers` service: one bidirectional stream per worker.

use std::sync::Arc;
use std::time::Duration;

use recur_proto::v1 as pb;
use recur_proto::v1::workers_server::Workers;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Event, Shared};
use crate::scheduler::PROTOCOL_VERSION;

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Implements `recur.v1.Workers`.
#[derive(Debug, Clone)]
pub struct WorkerService {
    pub(crate) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Workers for WorkerService {
    type JoinStream = UnboundedReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    #[tracing::instrument(skip_all)]
    async fn join(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let hello = match first {
            Some(pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Hello(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message on Join must be a hello",
                ));
            }
            None => return Err(Status::invalid_argument("the stream closed before a hello")),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker protocol version {} does not match the coordinator's {PROTOCOL_VERSION}; run the same recur release on both",
                hello.protocol_version
            )));
        }
        if hello.name.len() > 256 || hello.device.len() > 64 {
            return Err(Status::invalid_argument(
                "worker name (256) or device (64 bytes) too long",
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, id) = oneshot::channel();
        let (stop_reading, mut dropped) = oneshot::channel::<()>();
        self.shared.send(Event::Join {
            hello,
            tx,
            stop_reading,
            reply,
        })?;
        let id = id
            .await
            .map_err(|_| Status::unavailable("the coordinator is shutting down"))?;
        let events = self.shared.events.clone();
        tokio::spawn(async move {
            let reason = loop {
                let message = tokio::select! {
                    biased;
                    // The coordinator dropped this worker (or stopped): stop reading, which
                    // closes the stream even if the worker keeps its end open.
                    _ = &mut dropped => return,
                    message = inbound.message() => message,
                };
                match message {
                    Ok(Some(pb::WorkerMessage { kind: Some(kind) })) => {
                        let read_at = std::time::Instant::now();
                        if events.send(Event::Message(id, kind, read_at)).is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => break "sent an empty message".to_string(),
                    Ok(None) => break "stream closed".to_string(),
                    Err(status) => break format!("stream failed: {}", status.message()),
                }
            };
            let _ = events.send(Event::Closed(id, reason));
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}
