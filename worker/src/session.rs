//! The connection loop: join, run commands on the compute thread, heartbeat, reconnect.

use std::future::Future;
use std::time::Duration;

use recur_proto::transport;
use recur_proto::v1 as pb;
use recur_proto::v1::workers_client::WorkersClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::executor::Executor;
use crate::{DeviceSpec, Error, PROTOCOL_VERSION, Result};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The coordinator's URL, e.g. `http://10.0.0.1:7070`.
    pub coordinator: String,
    /// A name shown in `recur workers`.
    pub name: String,
    /// Where to compute.
    pub device: DeviceSpec,
    /// Compute threads (reported to the coordinator; the binary sizes candle's pool with it).
    pub threads: u32,
    /// First reconnect delay; doubles up to `max_backoff` while attempts fail, back to this after
    /// a session that joined and lasted at least `max_backoff`. Each wait is drawn between half the delay and the delay, so
    /// workers that lost the same coordinator do not all come back at once.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Largest message accepted or sent.
    pub max_message_bytes: usize,
    /// Token presented as `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// TLS towards the coordinator (its URL must then be `https://`).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Extra compute time per training row: makes this worker stand in for a slower host in
    /// tests and benchmarks of mixed clusters. Zero in normal use.
    pub throttle_per_row: Duration,
    /// Where the worker counts what it does (served by `--metrics-listen`), if anywhere.
    pub metrics: Option<crate::WorkerMetrics>,
}

impl WorkerConfig {
    /// Defaults for a coordinator URL.
    pub fn new(coordinator: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            coordinator: coordinator.into(),
            name: name.into(),
            device: DeviceSpec::Cpu,
            threads: 1,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
            token: None,
            tls: None,
            throttle_per_row: Duration::ZERO,
            metrics: None,
        }
    }
}

/// How a session ended.
enum Ended {
    /// Shutdown was asked for; the worker said goodbye.
    Shutdown,
    /// The connection was lost (or never made); try again. `joined` says whether the
    /// coordinator had welcomed this worker, which resets the backoff.
    Lost { reason: String, joined: bool },
}

/// Reconnect delays: exponential from `min` to `max`, each drawn with jitter in `[d/2, d]`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The wait before the next attempt, given `unit` in `[0, 1)`; doubles the delay after it.
    pub(crate) fn wait(&mut self, unit: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Starts over from the shortest delay (after a session that worked).
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Runs the worker until `shutdown` completes: joins the coordinator, serves its commands, and
/// reconnects with exponential backoff whenever the connection is lost. On shutdown it finishes
/// the command in progress and says goodbye. A protocol mismatch ends it with an error.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let device = config.device.open()?;
    if let Some(m) = &config.metrics {
        m.watch_device(&device);
    }
    let compute_threads = recur_core::fused::compute_threads();
    tracing::info!(
        name = %config.name,
        device = %config.device,
        threads = config.threads,
        compute_threads,
        "worker starting"
    );
    if compute_threads != config.threads as usize && config.device == DeviceSpec::Cpu {
        tracing::warn!(
            threads = config.threads,
            compute_threads,
            "this process's compute pool was sized before this worker started; its threads setting does not apply"
        );
    }
    let address_error = |e: &dyn std::fmt::Display| Error::Address {
        address: config.coordinator.clone(),
        problem: e.to_string(),
    };
    let mut endpoint =
        Endpoint::from_shared(config.coordinator.clone()).map_err(|e| address_error(&e))?;
    if let Some(tls) = config.tls.clone() {
        endpoint = endpoint.tls_config(tls).map_err(|e| address_error(&e))?;
    }
    let endpoint = endpoint
        .tcp_nodelay(true)
        .tcp_keepalive(Some(transport::KEEPALIVE_INTERVAL))
        .initial_stream_window_size(transport::STREAM_WINDOW)
        .initial_connection_window_size(transport::CONNECTION_WINDOW)
        .max_frame_size(transport::MAX_FRAME_SIZE)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut backoff = Backoff::new(config.min_backoff, config.max_backoff);
    loop {
        if *stop_rx.borrow() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let outcome = session(&config, &endpoint, device.clone(), stop_rx.clone()).await;
        // A session that joined and lasted resets the backoff; one dropped right after its
        // welcome does not, or a worker the coordinator keeps refusing would hammer it.
        if matches!(outcome, Ok(Ended::Lost { joined: true, .. }))
            && started.elapsed() >= config.max_backoff
        {
            backoff.reset();
        }
        let wait = backoff.wait(rand::random::<f64>());
        let retry_in_ms = wait.as_millis() as u64;
        match outcome {
            Ok(Ended::Shutdown) => {
                tracing::info!(coordinator = %config.coordinator, "left the coordinator");
                return Ok(());
            }
            Ok(Ended::Lost { reason, .. }) => {
                tracing::warn!(coordinator = %config.coordinator, %reason, retry_in_ms, "connection lost");
            }
            Err(e @ Error::Refused(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(coordinator = %config.coordinator, error = %e, retry_in_ms, "cannot join");
            }
        }
        let mut stop = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

async fn session(
    config: &WorkerConfig,
    endpoint: &Endpoint,
    device: candle_core::Device,
    mut stop: watch::Receiver<bool>,
) -> Result<Ended> {
    let channel: Channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => {
            return Ok(Ended::Lost {
                reason: format!("connect: {e}"),
                joined: false,
            });
        }
    };
    let auth = match &config.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<tonic::metadata::MetadataValue<_>>()
                .map_err(|_| {
                    Error::Refused("the worker token has characters a header cannot carry".into())
                })?,
        ),
        None => None,
    };
    let with_token = move |mut req: tonic::Request<()>| {
        if let Some(v) = &auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    };
    let mut client = WorkersClient::with_interceptor(channel, with_token)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let (out_tx, out_rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
    let send = |tx: &mpsc::UnboundedSender<pb::WorkerMessage>, kind| {
        tx.send(pb::WorkerMessage { kind: Some(kind) }).is_ok()
    };
    send(
        &out_tx,
        pb::worker_message::Kind::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            name: config.name.clone(),
            device: config.device.to_string(),
            threads: config.threads,
        }),
    );
    let mut inbound = match client.join(UnboundedReceiverStream::new(out_rx)).await {
        Ok(r) => r.into_inner(),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
            ) =>
        {
            return Err(Error::Refused(status.message().to_string()));
        }
        Err(status) => {
            return Ok(Ended::Lost {
                reason: format!("join: {}", status.message()),
                joined: false,
            });
        }
    };
    // The compute thread runs commands in order and sends the results itself.
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<pb::coordinator_message::Kind>();
    let results = out_tx.clone();
    let throttle = config.throttle_per_row;
    let metrics = config.metrics.clone();
    let compute = tokio::task::spawn_blocking(move || {
        let mut executor = Executor::new(device)
            .with_throttle(throttle)
            .with_metrics(metrics);
        while let Ok(cmd) = cmd_rx.recv() {
            if let Some(reply) = executor.handle(cmd)
                && results
                    .send(pb::WorkerMessage { kind: Some(reply) })
                    .is_err()
            {
                break;
            }
        }
    });
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    let mut joined = false;
    let ended = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break None,
            _ = heartbeat.tick() => {
                send(&out_tx, pb::worker_message::Kind::Heartbeat(pb::Heartbeat {}));
            }
            message = inbound.message() => match message {
                Ok(Some(pb::CoordinatorMessage { kind: Some(pb::coordinator_message::Kind::Welcome(w)) })) => {
                    tracing::info!(worker_id = %w.worker_id, coordinator = %config.coordinator, "joined");
                    joined = true;
                    if let Some(m) = &config.metrics {
                        m.joined.set(1);
                        m.joins.inc();
                    }
                    let every = Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(10)));
                    heartbeat = tokio::time::interval(every);
                }
                Ok(Some(pb::CoordinatorMessage { kind: Some(cmd) })) => {
                    if cmd_tx.send(cmd).is_err() {
                        break Some("the compute thread stopped".to_string());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break Some("the coordinator closed the stream".to_string()),
                Err(status) => break Some(format!("stream: {}", status.message())),
            }
        }
    };
    if let Some(m) = &config.metrics {
        m.joined.set(0);
    }
    // Let the compute thread finish what it has (at most the current step), then leave.
    drop(cmd_tx);
    let _ = compute.await;
    match ended {
        Some(reason) => Ok(Ended::Lost { reason, joined }),
        None => {
            send(
                &out_tx,
                pb::worker_message::Kind::Goodbye(pb::Goodbye {
                    reason: "shutting down".into(),
                }),
            );
            drop(out_tx);
            // The coordinator closes the stream once it has the goodbye.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
            Ok(Ended::Shutdown)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        assert_eq!(b.wait(1.0), ms(100));
        assert_eq!(b.wait(0.0), ms(100), "half of 200 ms at the low end");
        assert_eq!(b.wait(0.5), ms(300), "three quarters of 400 ms");
        assert_eq!(b.wait(1.0), ms(800));
        assert_eq!(b.wait(1.0), ms(1000), "capped");
        assert_eq!(b.wait(1.0), ms(1000));
        b.reset();
        assert_eq!(b.wait(1.0), ms(100));
        // Two workers drawing different numbers wait different times.
        let (mut x, mut y) = (
            Backoff::new(ms(100), ms(1000)),
            Backoff::new(ms(100), ms(1000)),
        );
        assert_ne!(x.wait(0.1), y.wait(0.9));
    }
}
