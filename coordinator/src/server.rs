//! Starting and stopping the coordinator: storage, the scheduler loop and the gRPC server.

use std::future::Future;
use std::sync::Arc;

use recur_core::checkpoint::Checkpoint;
use recur_core::sets::{CheckpointSets, Role};
use recur_proto::transport::{
    CONNECTION_WINDOW, KEEPALIVE_INTERVAL, MAX_FRAME_SIZE, STREAM_WINDOW,
};
use recur_proto::v1::recur_server::RecurServer;
use recur_proto::v1::workers_server::WorkersServer;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tonic::transport::server::TcpIncoming;

use tonic::service::interceptor::InterceptedService;

use crate::auth::{Audience, TokenCheck};
use crate::config::CoordinatorConfig;
use crate::datasets::Datasets;
use crate::predict::Predictor;
use crate::scheduler::{JobState, NewJob, Resume, Scheduler, SchedulerConfig};
use crate::service::{ClientService, Event, Shared, WorkerService, scheduler_loop};
use crate::store::{JobRecord, Store};
use crate::{Error, Result};

/// Serves the coordinator on `listener` until `shutdown` completes, then stops: worker streams
/// and watches are closed and the scheduler loop ends. Jobs that were running are resumed from
/// their latest checkpoint at the next start.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve(listener, None, config, shutdown).await
}

/// [`run`], and `GET /metrics` over plain HTTP on `metrics` too (`--metrics-listen`): a scraper
/// needs neither the gRPC port's TLS client certificate nor HTTP/2 there.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.validate()?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
    let store = Store::open(&data_dir.join("jobs.redb"))?;
    let datasets = Datasets::open(data_dir.join("datasets"), config.csv)?;
    let predictor = Predictor::start(data_dir.join("jobs"));
    let sessions = crate::stream::Sessions::new(
        data_dir.join("jobs"),
        config.max_stream_sessions,
        config.stream_idle,
    );
    let (events, events_rx) = mpsc::unbounded_channel();
    let (watch, _) = broadcast::channel(1024);
    let (stop, _) = broadcast::channel(1);
    let shared = Arc::new(Shared {
        uploads: tokio::sync::Semaphore::new(config.max_concurrent_uploads),
        datasets_gate: tokio::sync::RwLock::new(()),
        config,
        store,
        datasets,
        predictor,
        sessions,
        events,
        watch,
        shutdown: stop.clone(),
        metrics: crate::metrics::Metrics::new()
            .map_err(|e| Error::FailedPrecondition(format!("metrics: {e}")))?,
    });
    let scheduler = Scheduler::new(SchedulerConfig {
        heartbeat_timeout: shared.config.heartbeat_timeout,
        no_worker_grace: shared.config.no_worker_grace,
        replicate_values: shared.config.replicate_values,
        deadline_floor: shared.config.part_deadline_floor,
        ..SchedulerConfig::default()
    });
    recover_jobs(&shared)?;
    let loop_task = tokio::spawn(scheduler_loop(
        shared.clone(),
        scheduler,
        events_rx,
        stop.subscribe(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RecurServer<ClientService>>().await;
    health.set_serving::<WorkersServer<WorkerService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(recur_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::FailedPrecondition(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(recur_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::FailedPrecondition(format!("reflection: {e}")))?;
    let max = shared.config.max_message_bytes;
    let (client_token, worker_token) = (
        shared.config.client_token.clone(),
        shared.config.worker_token.clone(),
    );
    let client = InterceptedService::new(
        RecurServer::new(ClientService {
            shared: shared.clone(),
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
        TokenCheck::new(
            Audience::Clients,
            client_token.clone(),
            worker_token.clone(),
        ),
    );
    let workers = InterceptedService::new(
        WorkersServer::new(WorkerService {
            shared: shared.clone(),
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
        TokenCheck::new(Audience::Workers, worker_token, client_token),
    );
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener", e))?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "coordinator serving");
    let graceful = async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop.send(());
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = shared.config.tls.clone() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?;
    }
    let mut routes = tonic::service::RoutesBuilder::default();
    routes
        .add_service(client)
        .add_service(workers)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Prometheus scrapes `GET /metrics` over HTTP/1.1 on the same port; it needs no token.
    let router = routes
        .routes()
        .into_axum_router()
        .merge(metrics_router(&shared.metrics));
    let metrics_task = match metrics {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::io("metrics listener", e))?;
            tracing::info!(%addr, "metrics served over HTTP");
            let mut stop = shared.shutdown.subscribe();
            let app = metrics_router(&shared.metrics);
            Some(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.recv().await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            }))
        }
        None => None,
    };
    let grpc_metrics = crate::grpc_metrics::GrpcMetricsLayer::new(
        shared.metrics.grpc_calls.clone(),
        shared.metrics.grpc_seconds.clone(),
        &[
            recur_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
    )
    .map_err(|e| Error::FailedPrecondition(format!("gRPC metrics: {e}")))?;
    let served = builder
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_INTERVAL * 2))
        .accept_http1(true)
        .layer(grpc_metrics)
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(incoming(listener), graceful)
        .await;
    let _ = shared.shutdown.send(());
    let _ = loop_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    served.map_err(|e| Error::FailedPrecondition(format!("server: {e}")))
}

/// `GET /metrics`: the Prometheus text of every metric.
fn metrics_router(metrics: &crate::metrics::Metrics) -> axum::Router {
    let metrics = metrics.clone();
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { metrics.render() }
        }),
    )
}

/// The connections the coordinator accepts on `listener`, each with `TCP_NODELAY` (a reply that
/// spans two writes must not wait for the peer's delayed ACK: 40 ms on Linux) and TCP keepalive.
/// The server builder's own `tcp_nodelay` applies only to listeners tonic binds itself.
pub(crate) fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(KEEPALIVE_INTERVAL))
        .with_keepalive_interval(Some(KEEPALIVE_INTERVAL))
}

/// The checkpoint (in the job's directory) that holds a fine-tuned job's starting parameters.
pub(crate) const INIT_STEM: &str = "init";

/// Removes what job deletions interrupted by a crash left (`.deleted-JOB` directories).
fn sweep_deleted(jobs: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(jobs) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".deleted-") {
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed the rest of a deleted job")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot remove the rest of a deleted job")
                }
            }
        }
    }
}

/// Re-queues the jobs a previous run left queued or running; running ones resume from their
/// `latest` checkpoint set (see [`resume_point`]). Checkpoints of the earlier file layout are
/// converted to sets first, for every job.
fn recover_jobs(shared: &Shared) -> Result<()> {
    sweep_deleted(&shared.jobs_dir());
    let mut jobs = shared.store.jobs()?;
    jobs.reverse(); // oldest first
    let mut resumed = Vec::new();
    for record in jobs {
        crate::service::job_metrics(shared, &record);
        let dir = shared.jobs_dir().join(&record.id.0);
        match CheckpointSets::new(&dir).migrate_legacy(shared.config.keep_checkpoints) {
            Ok(roles) if !roles.is_empty() => {
                tracing::info!(job = %record.id, ?roles, "checkpoints of the earlier layout converted to sets");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(job = %record.id, error = %e, "cannot convert checkpoints of the earlier layout");
            }
        }
        if record.state.is_final() {
            continue;
        }
        let meta = shared
            .store
            .dataset(&record.spec.dataset)?
            .unwrap_or_default();
        let data = match shared
            .datasets
            .prepare(&record.spec, meta.layout, &meta.name)
        {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::error!(job = %record.id, error = %e, "cannot recover job: dataset unreadable");
                let mut failed = record.clone();
                failed.state = JobState::Failed;
                failed.message = format!("dataset unreadable after restart: {e}");
                shared.store.put_job(&failed)?;
                continue;
            }
        };
        let mut record = record;
        let resume = if record.state == JobState::Running {
            match resume_point(shared, &mut record, &dir)? {
                Ok(resume) => resume,
                Err(reason) => {
                    tracing::error!(job = %record.id, %reason, "cannot resume job");
                    record.state = JobState::Failed;
                    record.message = reason;
                    shared.store.put_job(&record)?;
                    continue;
                }
            }
        } else {
            None
        };
        // The record says where the job really continues from.
        record.epochs = resume.as_ref().map_or(0, |r| r.latest.manifest.epoch);
        record.steps = resume.as_ref().map_or(0, |r| r.latest.manifest.step);
        let best = resume.as_ref().and_then(|r| r.best.as_ref());
        record.best_epoch = best.map_or(0, |b| b.manifest.epoch);
        record.best_validation = best.and_then(|b| b.manifest.validation);
        shared.store.put_job(&record)?;
        // A fine-tuned job that starts over starts from its copy of the other job's parameters.
        let init = match (&resume, &record.spec.init_from) {
            (None, Some(_)) => match Checkpoint::load(&dir, INIT_STEM) {
                Ok(c) => Some(c.params),
                Err(e) => {
                    tracing::error!(job = %record.id, error = %e, "cannot recover job: its starting parameters are unreadable");
                    record.state = JobState::Failed;
                    record.message =
                        format!("its starting parameters are unreadable after restart: {e}");
                    shared.store.put_job(&record)?;
                    continue;
                }
            },
            _ => None,
        };
        let job = NewJob {
            id: record.id.clone(),
            spec: record.spec.clone(),
            data,
            init,
            resume,
        };
        if job.resume.is_some() {
            resumed.push(job);
        } else {
            shared
                .send(Event::Submit(Box::new(job)))
                .map_err(|_| Error::ShuttingDown)?;
        }
    }
    // Resumed jobs go to the front of the queue, oldest first.
    for job in resumed.into_iter().rev() {
        shared
            .send(Event::Submit(Box::new(job)))
            .map_err(|_| Error::ShuttingDown)?;
    }
    Ok(())
}

/// The checkpoint set a running job continues from: the one `latest` names, or the newest older
/// one when it is damaged (the damage is kept in the record's warnings, shown by `recur status`);
/// `Ok(None)` to start over when the job never saved a set. A job whose sets are all damaged is
/// not silently started over: the returned reason fails it. The history and the step log are cut
/// back to the set's epoch and step.
fn resume_point(
    shared: &Shared,
    record: &mut JobRecord,
    dir: &std::path::Path,
) -> Result<std::result::Result<Option<Resume>, String>> {
    let id = record.id.clone();
    let sets = CheckpointSets::new(dir);
    let recovered = sets.recover(Role::Latest, |_| true)?;
    let Some((latest_set, latest)) = recovered.loaded else {
        if recovered.existed {
            let damage: Vec<String> = recovered.damaged.iter().map(|d| d.to_string()).collect();
            return Ok(Err(format!(
                "no checkpoint set of this job loads, so it cannot resume ({}); resubmit it to start over",
                damage.join("; ")
            )));
        }
        tracing::info!(job = %id, "no checkpoint yet; the job starts over");
        shared.store.truncate_history(&id, 0, 0)?;
        return Ok(Ok(None));
    };
    let mut warn = |warning: String| {
        // A restart before the next save finds the same damage again: say it once.
        if !record.warnings.contains(&warning) {
            record.warnings.push(warning);
        }
    };
    for d in &recovered.damaged {
        tracing::error!(job = %id, set = %d.set, problem = %d.problem, resumed_from = %latest_set, "checkpoint set damaged; resuming from an older one");
        warn(format!(
            "{d}; resumed from {latest_set} (epoch {})",
            latest.manifest.epoch
        ));
    }
    let step = latest.manifest.step;
    let best = sets.recover(Role::Best, |m| m.step <= step)?;
    for d in &best.damaged {
        tracing::error!(job = %id, set = %d.set, problem = %d.problem, "best checkpoint set damaged");
        warn(match &best.loaded {
            Some((name, _)) => format!("{d}; the best model is now {name}"),
            None => format!("{d}; no earlier best set loads"),
        });
    }
    // The pointers follow the resume point: `latest` away from a damaged set, `best` back from
    // one saved after it (its epoch is trained again), so downloads and predictions serve what
    // the job's record says.
    if sets.current(Role::Latest).ok().flatten().as_deref() != Some(latest_set.as_str()) {
        sets.point(Role::Latest, &latest_set)?;
    }
    match &best.loaded {
        Some((name, _)) if sets.current(Role::Best).ok().flatten().as_deref() != Some(name) => {
            sets.point(Role::Best, name)?;
        }
        Some(_) => {}
        None => sets.unpoint(Role::Best)?,
    }
    shared
        .store
        .truncate_history(&id, latest.manifest.epoch, step)?;
    let history = shared.store.history(&id)?;
    tracing::info!(job = %id, epoch = latest.manifest.epoch, step, set = %latest_set, "resuming job");
    Ok(Ok(Some(Resume {
        latest,
        best: best.loaded.map(|(_, b)| b),
        history,
    })))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = accepted.next().await.unwrap().unwrap();
        assert!(
            stream.nodelay().unwrap(),
            "Nagle must be off on accepted sockets"
        );
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap(), "TCP keepalive must be on");
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_INTERVAL);
    }
}
