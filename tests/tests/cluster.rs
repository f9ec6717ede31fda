//! The cluster end to end: real coordinator, real workers, real gRPC on 127.0.0.1.

use std::time::Duration;

use candle_core::Device;
use recur_coordinator::CoordinatorConfig;
use recur_core::data::{BallConfig, Dataset};
use recur_core::model::{ModelConfig, SeqModel};
use recur_core::optim::OptimizerConfig;
use recur_core::step::{Batch, predict};
use recur_core::train::{TrainConfig, Trainer};
use recur_proto::v1 as pb;
use recur_tests::{TestCluster, assert_params_close, checkpoint, spec, state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_the_tutorial_task_past_its_accuracy() {
    let mut tc = TestCluster::start(2).await;
    let data = BallConfig::tutorial(5).generate().unwrap();
    let dataset = tc.upload(&data).await;
    let job = tc
        .submit(pb::JobSpec {
            target_accuracy: Some(0.97),
            max_epochs: 1500,
            ..spec(&dataset, 5)
        })
        .await;
    let (epochs, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let test = info.test.unwrap();
    let last = epochs.last().unwrap();
    let timing = last.timing.unwrap();
    eprintln!(
        "{} epochs, test accuracy {:.4}, MAE {:.4}, exact {:.3}; last epoch {:.3}s, step {:.3} ms (compute {:.3}, wait {:.3}, reduce {:.4}, optimizer {:.4})",
        epochs.len(),
        test.accuracy,
        test.mae,
        test.exact,
        last.seconds,
        timing.total_ms,
        timing.compute_ms,
        timing.wait_ms,
        timing.reduce_ms,
        timing.optimizer_ms
    );
    assert!(test.accuracy >= 0.95, "test accuracy {}", test.accuracy);
    assert!(epochs.iter().all(|e| e.workers == 2));
    let best = checkpoint(&mut tc.client, &job, false).await.1;
    assert_eq!(best.len(), 97);
    tc.shutdown().await;
}

async fn params_after_steps(workers: usize, data: &Dataset, job: pb::JobSpec) -> Vec<f32> {
    params_after_steps_with(workers, data, job, |_| {}).await
}

async fn params_after_steps_with(
    workers: usize,
    data: &Dataset,
    job: pb::JobSpec,
    adjust: impl FnOnce(&mut CoordinatorConfig),
) -> Vec<f32> {
    let mut tc = TestCluster::start_with(workers, adjust).await;
    let dataset = tc.upload(data).await;
    let id = tc
        .submit(pb::JobSpec {
            dataset_id: dataset,
            ..job
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    assert_eq!(info.stop_reason, "max_steps");
    let params = checkpoint(&mut tc.client, &id, true).await.1;
    tc.shutdown().await;
    params
}

fn single_process(data: &Dataset, config: TrainConfig, steps: usize) -> Vec<f32> {
    let mut trainer = Trainer::new(config, data, &Device::Cpu).unwrap();
    for rows in trainer.next_epoch_batches().into_iter().take(steps) {
        trainer.train_step(&rows).unwrap();
    }
    trainer.params().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_and_three_workers_and_one_process_agree_after_20_steps() {
    let data = BallConfig {
        rows: 2000,
        ..BallConfig::tutorial(8)
    }
    .generate()
    .unwrap();
    let job = pb::JobSpec {
        batch_size: Some(50),
        max_steps: 20,
        ..spec("", 8)
    };
    let one = params_after_steps(1, &data, job.clone()).await;
    let three = params_after_steps(3, &data, job).await;
    let reference = single_process(
        &data,
        TrainConfig {
            batch_size: 50,
            seed: 8,
            ..TrainConfig::default()
        },
        20,
    );
    assert_params_close(&three, &one, "3 workers vs 1");
    assert_params_close(&one, &reference, "1 worker vs recur-core");
    assert_params_close(&three, &reference, "3 workers vs recur-core");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uneven_shards_neither_hang_nor_bias_the_gradient() {
    // Rows from 2 to 60 values: shards differ a lot in row count.
    let mut data = Dataset::default();
    for i in 0..600usize {
        let len = 2 + (i * 7919) % 59;
        let row: Vec<f32> = (0..len).map(|k| ((i + 3 * k) % 41) as f32 - 20.0).collect();
        data.push_row(&row);
    }
    let job = pb::JobSpec {
        batch_size: Some(64),
        max_steps: 5,
        optimizer: Some(pb::OptimizerSpec {
            kind: pb::optimizer_spec::Kind::Sgd as i32,
            lr: Some(0.1),
            ..Default::default()
        }),
        ..spec("", 2)
    };
    let three = params_after_steps(3, &data, job.clone()).await;
    // The same with every worker holding only its own shard of the training rows (the layout
    // used when the training split is too large to give every worker all of it).
    let sharded = params_after_steps_with(3, &data, job, |c| c.replicate_values = 0).await;
    let config = TrainConfig {
        batch_size: 64,
        seed: 2,
        optimizer: OptimizerConfig::sgd(0.1),
        ..TrainConfig::default()
    };
    let reference = single_process(&data, config, 5);
    assert_params_close(&three, &reference, "3 uneven workers vs recur-core");
    assert_params_close(
        &sharded,
        &reference,
        "3 uneven sharded workers vs recur-core",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_worker_gets_a_share_of_each_step_in_proportion_to_its_speed() {
    // One normal worker and one that takes 2 ms more for every row (a much slower host). With
    // equal parts every step would take at least 50 rows x 2 ms = 100 ms.
    let per_row = Duration::from_millis(2);
    let mut tc = TestCluster::start(1).await;
    tc.cluster.add_worker_with(|w| w.throttle_per_row = per_row);
    tc.wait_for_workers(2).await;
    // 3,000 training rows: the 30 steps are one epoch.
    let data = BallConfig {
        rows: 5000,
        ..BallConfig::tutorial(6)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let job = tc
        .submit(pb::JobSpec {
            batch_size: Some(100),
            max_steps: 30,
            ..spec(&dataset, 6)
        })
        .await;
    let (epochs, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let workers = tc.client.workers().await.unwrap();
    let slow = workers.iter().find(|w| w.name == "local-2").unwrap();
    let fast = workers.iter().find(|w| w.name == "local-1").unwrap();
    assert_eq!(slow.train_rows + fast.train_rows, 30 * 100);
    let share = slow.train_rows as f64 / 3000.0;
    assert!(
        share < 0.15,
        "the slow worker computed {:.0}% of the rows (equal parts: 50%)",
        share * 100.0
    );
    // The speeds are learned from the first step on.
    let timing = epochs.last().unwrap().timing.unwrap();
    assert!(
        timing.total_ms < 50.0,
        "steps took {:.1} ms on average; with equal parts none could take less than 100 ms",
        timing.total_ms
    );
    // Who computed what does not change the result.
    let params = checkpoint(&mut tc.client, &job, true).await.1;
    tc.shutdown().await;
    let reference = single_process(
        &data,
        TrainConfig {
            batch_size: 100,
            seed: 6,
            ..TrainConfig::default()
        },
        30,
    );
    assert_params_close(
        &params,
        &reference,
        "a fast and a slow worker vs recur-core",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_every_epoch_in_order_and_late_subscribers_get_the_history() {
    let mut tc = TestCluster::start(2).await;
    let data = BallConfig {
        rows: 1000,
        ..BallConfig::tutorial(1)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 5,
            ..spec(&dataset, 1)
        })
        .await;
    let (live, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    assert_eq!(
        live.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let (late, late_info) = tc.follow(&job).await;
    assert_eq!(late, live);
    assert_eq!(state(&late_info), pb::JobState::Completed);
    assert_eq!(late_info.epochs, 5);
    assert_eq!(late_info.stop_reason, "max_epochs");
    // Prometheus metrics on the same port, no token needed.
    let body = recur_tests::scrape_metrics(tc.cluster.addr()).await;
    assert_eq!(
        recur_tests::metric(&body, "recur_steps_total"),
        Some(late_info.steps as f64),
        "{body}"
    );
    assert_eq!(recur_tests::metric(&body, "recur_epochs_total"), Some(5.0));
    assert_eq!(recur_tests::metric(&body, "recur_workers"), Some(2.0));
    assert_eq!(
        recur_tests::metric(&body, "recur_step_seconds_count"),
        Some(late_info.steps as f64)
    );
    // Per job, per worker, outcomes, queue, build and process.
    let labelled = |name: &str| recur_tests::metric(&body, name);
    assert_eq!(
        labelled(&format!("recur_job_epochs{{job=\"{job}\"}}")),
        Some(5.0),
        "{body}"
    );
    assert_eq!(
        labelled(&format!("recur_job_steps{{job=\"{job}\"}}")),
        Some(late_info.steps as f64)
    );
    assert_eq!(
        labelled(&format!(
            "recur_job_state{{job=\"{job}\",state=\"completed\"}}"
        )),
        Some(1.0)
    );
    assert_eq!(
        labelled(&format!(
            "recur_job_state{{job=\"{job}\",state=\"running\"}}"
        )),
        Some(0.0)
    );
    let accuracy = late.last().unwrap().validation.unwrap().accuracy;
    let reported = labelled(&format!(
        "recur_job_last_epoch{{job=\"{job}\",metric=\"validation_accuracy\"}}"
    ))
    .unwrap();
    assert!(
        (reported - accuracy).abs() < 1e-9,
        "{reported} vs {accuracy}"
    );
    assert_eq!(
        labelled("recur_jobs_finished_total{state=\"completed\"}"),
        Some(1.0)
    );
    assert_eq!(labelled("recur_queued_jobs"), Some(0.0));
    assert_eq!(
        labelled(&format!(
            "recur_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0)
    );
    assert!(
        body.contains("recur_worker{device=\"cpu\",metric=\"steps\",name=\"local-1\",worker=\"w-"),
        "{body}"
    );
    assert!(labelled("process_resident_memory_bytes").is_some_and(|b| b > 0.0));
    // Per worker: compute and transport time of the parts it returned.
    let compute = body
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "recur_worker{device=\"cpu\",metric=\"compute_seconds\",name=\"local-1\"",
            )
        })
        .and_then(|rest| rest.split_whitespace().last()?.parse::<f64>().ok());
    assert!(compute.is_some_and(|s| s > 0.0), "{body}");
    // gRPC calls by method and status: a streamed answer's status comes in its trailers.
    let calls = |method: &str| {
        labelled(&format!(
            "recur_grpc_requests_total{{code=\"OK\",method=\"{method}\",service=\"recur.v1.Recur\"}}"
        ))
    };
    assert_eq!(calls("SubmitJob"), Some(1.0), "{body}");
    assert_eq!(calls("UploadDataset"), Some(1.0), "{body}");
    assert!(calls("WatchJob").is_some_and(|n| n >= 2.0), "{body}");
    assert!(
        body.contains(
            "recur_grpc_request_seconds_count{method=\"SubmitJob\",service=\"recur.v1.Recur\"} 1"
        ),
        "{body}"
    );
    // The Grafana dashboard in deploy/ uses only metrics that exist.
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/recur-dashboard.json")).unwrap();
    let names = recur_tests::dashboard_metrics(&dashboard);
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard's {name} is not exported:\n{body}"
        );
    }
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_the_queued_one_runs() {
    let mut tc = TestCluster::start(2).await;
    let data = BallConfig {
        rows: 1000,
        ..BallConfig::tutorial(2)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let long = tc
        .submit(pb::JobSpec {
            max_epochs: 1_000_000,
            patience: 1_000_000,
            ..spec(&dataset, 2)
        })
        .await;
    let short = tc
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..spec(&dataset, 3)
        })
        .await;
    assert_eq!(
        state(&tc.client.job(&short).await.unwrap()),
        pb::JobState::Queued
    );
    // Wait for the long job's first epoch.
    let mut stream = tc.client.watch(&long).await.unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        if matches!(msg.event, Some(pb::watch_job_response::Event::Epoch(_))) {
            break;
        }
    }
    let cancelled = tc.client.cancel(&long).await.unwrap();
    assert_eq!(state(&cancelled), pb::JobState::Cancelled);
    let (_, info) = tc.follow(&short).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    // No step was applied to the cancelled job after the cancel returned.
    let after = tc.client.job(&long).await.unwrap();
    assert_eq!(after.steps, cancelled.steps);
    assert_eq!(state(&after), pb::JobState::Cancelled);
    let err = tc.client.cancel(&long).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition));
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_matches_the_downloaded_checkpoint_and_names_bad_rows() {
    let mut tc = TestCluster::start(2).await;
    let data = BallConfig {
        rows: 1000,
        ..BallConfig::tutorial(4)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 3,
            ..spec(&dataset, 4)
        })
        .await;
    let (_, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    let waiting = tc.job_without_checkpoint(&dataset).await;
    let err = tc
        .client
        .predict(&waiting, vec![vec![1.0, 2.0]])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");

    let histories = vec![
        vec![1.0, 2.0, 3.0],
        vec![3.0, 5.0, 7.0],
        vec![9.0, 7.0, 5.0, 3.0],
        vec![2.0, 0.0, -2.0],
        vec![0.0, -3.0, -6.0],
    ];
    let answer = tc.client.predict(&job, histories.clone()).await.unwrap();
    let params = checkpoint(&mut tc.client, &job, false).await.1;
    let model = SeqModel::new(
        recur_core::model::Params::from_flat(ModelConfig::tutorial(), &params, &Device::Cpu)
            .unwrap(),
    );
    let scaled: Vec<Vec<f32>> = histories
        .iter()
        .map(|h| h.iter().map(|v| v / 50.0).collect())
        .collect();
    let inputs: Vec<&[f32]> = scaled.iter().map(Vec::as_slice).collect();
    let local = predict(
        &model,
        &Batch::from_inputs(&inputs, 1, &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert_eq!(answer.predictions.len(), 5);
    for (a, b) in answer.predictions.iter().zip(&local) {
        assert!((a - b * 50.0).abs() < 1e-4, "{a} vs {}", b * 50.0);
    }
    assert_eq!(answer.epoch, info.best_epoch);

    let bad: Vec<(Vec<Vec<f32>>, &str)> = vec![
        (vec![vec![1.0], vec![]], "sequence 1: is empty"),
        (vec![vec![f32::NAN, 1.0]], "sequence 0: value 1 (NaN)"),
        (vec![vec![1.0; 5000]], "sequence 0: has 5000 values"),
        (vec![], "no sequences"),
    ];
    for (rows, message) in bad {
        let err = tc.client.predict(&job, rows).await.unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
        assert!(
            err.to_string().contains(message),
            "`{err}` lacks `{message}`"
        );
    }
    let err = tc
        .client
        .predict("job-999", vec![vec![1.0]])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound));
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_never_fail_while_checkpoint_sets_are_replaced() {
    // One set kept per role: each new best removes the one before, under the predictor.
    let mut tc = TestCluster::start_with(2, |c| c.keep_checkpoints = 1).await;
    let dataset = recur_tests::upload_ball(&mut tc.client, 1000, 6).await;
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 40,
            patience: 1000,
            ..spec(&dataset, 6)
        })
        .await;
    let url = tc.cluster.url();
    let mut watcher = recur_client::Client::connect(&url, None).await.unwrap();
    recur_tests::wait_for(60, "a first best checkpoint", async || {
        watcher
            .job(&job)
            .await
            .is_ok_and(|j| j.best_validation.is_some())
    })
    .await;
    // Two callers predict until the job ends; a third sends bad histories at the same time.
    let caller = |url: String, job: String| async move {
        let mut c = recur_client::Client::connect(&url, None).await.unwrap();
        let mut epochs = Vec::new();
        loop {
            let info = c.job(&job).await.unwrap();
            let done =
                state(&info) != pb::JobState::Running && state(&info) != pb::JobState::Queued;
            let answer = c
                .predict(&job, vec![vec![1.0, 3.0, 5.0], vec![2.0, 0.0]])
                .await
                .unwrap_or_else(|e| panic!("a prediction failed during training: {e}"));
            assert_eq!(answer.predictions.len(), 2);
            epochs.push(answer.epoch);
            if done {
                return epochs;
            }
        }
    };
    let bad = {
        let (url, job) = (url.clone(), job.clone());
        tokio::spawn(async move {
            let mut c = recur_client::Client::connect(&url, None).await.unwrap();
            for _ in 0..200 {
                let err = c
                    .predict(&job, vec![vec![1.0], vec![f32::INFINITY]])
                    .await
                    .unwrap_err();
                assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
            }
        })
    };
    let a = tokio::spawn(caller(url.clone(), job.clone()));
    let b = tokio::spawn(caller(url.clone(), job.clone()));
    let (a, b) = tokio::time::timeout(Duration::from_secs(300), async {
        (a.await.unwrap(), b.await.unwrap())
    })
    .await
    .expect("the job did not end in time");
    bad.await.unwrap();
    let info = tc.client.job(&job).await.unwrap();
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    for epochs in [&a, &b] {
        assert!(
            epochs.windows(2).all(|w| w[0] <= w[1]),
            "a caller went back to an older model: {epochs:?}"
        );
        assert_eq!(
            epochs.last(),
            Some(&info.best_epoch),
            "the final best answers"
        );
    }
    let mut seen: Vec<u64> = a.iter().chain(&b).copied().collect();
    seen.dedup();
    seen.sort_unstable();
    seen.dedup();
    assert!(
        seen.len() >= 2,
        "the best set was never replaced while predicting: {seen:?}"
    );
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_joins_mid_job_gets_a_shard_at_the_next_epoch() {
    let mut tc = TestCluster::start(1).await;
    let data = BallConfig::tutorial(6).generate().unwrap();
    let dataset = tc.upload(&data).await;
    // Long enough (about 150 x 60 steps) for the new worker to join well before the end.
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 150,
            patience: 1_000_000,
            ..spec(&dataset, 6)
        })
        .await;
    let mut stream = tc.client.watch(&job).await.unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        if matches!(msg.event, Some(pb::watch_job_response::Event::Epoch(_))) {
            break;
        }
    }
    tc.cluster.add_worker();
    let (epochs, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    assert_eq!(epochs[0].workers, 1);
    assert_eq!(epochs.last().unwrap().workers, 2, "{epochs:?}");
    let workers = tc.client.workers().await.unwrap();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().all(|w| w.steps > 0), "{workers:?}");
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_version_mismatch_is_refused() {
    let tc = TestCluster::start(0).await;
    let mut raw = pb::workers_client::WorkersClient::connect(tc.cluster.url())
        .await
        .unwrap();
    let hello = pb::WorkerMessage {
        kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
            protocol_version: recur_coordinator::PROTOCOL_VERSION + 1,
            name: "old".into(),
            device: "cpu".into(),
            threads: 1,
        })),
    };
    let err = raw.join(tokio_stream::iter(vec![hello])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("protocol version"),
        "{}",
        err.message()
    );
    // The coordinator keeps serving and counted no worker.
    let mut client = tc.client.clone();
    assert!(client.workers().await.unwrap().is_empty());
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_v1_and_v1alpha_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let tc = TestCluster::start(0).await;
    let channel = tonic::transport::Endpoint::from_shared(tc.cluster.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "recur.v1.Recur", "recur.v1.Workers"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            stream.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"recur.v1.Recur".to_string()), "{names:?}");
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "recur.v1.Recur".into(),
            )),
        };
        let mut stream = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let response = stream.message().await.unwrap().unwrap().message_response;
        assert!(
            matches!(response, Some(MessageResponse::FileDescriptorResponse(f)) if !f.file_descriptor_proto.is_empty())
        );
    }
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_replies_wait_for_no_delayed_ack() {
    // With Nagle's algorithm on the coordinator's sockets a reply written in two parts waits for
    // the peer's delayed ACK (40 ms on Linux): a Predict of 100 histories took 44 ms instead of
    // under 1 ms (this test's median with Nagle on: 44 ms). The bound is generous for a loaded
    // machine (the tutorial model answers 1,000 histories in well under a millisecond) but a
    // stall cannot meet it.
    let mut tc = TestCluster::start(1).await;
    let data = BallConfig {
        rows: 1500,
        ..BallConfig::tutorial(9)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let job = tc
        .submit(pb::JobSpec {
            max_steps: 10,
            ..spec(&dataset, 9)
        })
        .await;
    let (_, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    for n in [100, 1000] {
        let histories: Vec<Vec<f32>> = (0..n)
            .map(|r| {
                let row = data.row(r);
                row[..row.len() - 1].to_vec()
            })
            .collect();
        tc.client.predict(&job, histories.clone()).await.unwrap();
        let mut took = Vec::new();
        for _ in 0..15 {
            let start = std::time::Instant::now();
            let reply = tc.client.predict(&job, histories.clone()).await.unwrap();
            took.push(start.elapsed());
            assert_eq!(reply.predictions.len(), n);
        }
        took.sort();
        assert!(
            took[7] < Duration::from_millis(20),
            "Predict of {n} histories: median {:?}",
            took[7]
        );
    }
    tc.shutdown().await;
}

#[test]
fn a_worker_whose_compute_hangs_while_its_heartbeats_go_on_is_dropped_by_its_deadline() {
    // The hung worker's compute thread sleeps for minutes; a runtime shut down in the background
    // at the end leaves it behind instead of waiting for it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tc = TestCluster::start_with(1, |c| {
            c.part_deadline_floor = Duration::from_secs(1);
            // Only the deadline can find the hang: heartbeats keep coming, and would be waited
            // for much longer.
            c.heartbeat_timeout = Duration::from_secs(60);
        })
        .await;
        let hung = tc
            .cluster
            .add_worker_with(|w| w.throttle_per_row = Duration::from_secs(10));
        tc.wait_for_workers(2).await;
        let data = BallConfig {
            rows: 2000,
            ..BallConfig::tutorial(10)
        }
        .generate()
        .unwrap();
        let dataset = tc.upload(&data).await;
        let job = tc
            .submit(pb::JobSpec {
                batch_size: Some(100),
                max_steps: 6,
                ..spec(&dataset, 10)
            })
            .await;
        // The hung worker's first part alone would take 500 s.
        let (_, info) = tokio::time::timeout(Duration::from_secs(60), tc.follow(&job))
            .await
            .expect("the job finished without waiting for the hung worker");
        assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
        assert_eq!(info.steps, 6);
        let names: Vec<String> = tc
            .client
            .workers()
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.name)
            .collect();
        assert_eq!(names, ["local-1"], "the hung worker was dropped");
        let body = recur_tests::scrape_metrics(tc.cluster.addr()).await;
        assert_eq!(
            recur_tests::labelled_metric(
                &body,
                "recur_workers_gone_total",
                &[("cause", "dropped"), ("device", "cpu")]
            ),
            Some(1.0),
            "{body}"
        );
        tc.cluster.kill_worker(hung);
        tc.shutdown().await;
    });
    rt.shutdown_background();
}

/// A job whose progress shows a best validation has its best checkpoint on disk: a client that
/// predicts as soon as it sees one is answered, even when each write takes 300 ms (the record
/// used to be written before the checkpoint it announces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_best_validation_in_the_progress_means_predict_answers() {
    let mut tc = TestCluster::start_with(1, |c| c.write_delay = Duration::from_millis(300)).await;
    let dataset = recur_tests::upload_ball(&mut tc.client, 300, 3).await;
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 3,
            ..spec(&dataset, 3)
        })
        .await;
    let mut watcher = recur_client::Client::connect(&tc.cluster.url(), None)
        .await
        .unwrap();
    recur_tests::wait_for(60, "a first best validation", async || {
        watcher
            .job(&job)
            .await
            .is_ok_and(|j| j.best_validation.is_some())
    })
    .await;
    let answer = tc
        .client
        .predict(&job, vec![vec![1.0, 3.0, 5.0]])
        .await
        .expect("the progress announced a best checkpoint that Predict cannot find");
    assert_eq!(answer.predictions.len(), 1);
    tc.follow(&job).await;
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_delays_epochs_but_never_drops_a_healthy_worker() {
    // Every store and checkpoint write takes 1 s, and a worker is silent after 2 s: an epoch's
    // writes (history, job record, best and latest checkpoints) block twice the heartbeat
    // timeout, with room for a loaded machine's scheduling.
    let mut tc = TestCluster::start_with(2, |c| {
        c.write_delay = Duration::from_secs(1);
        c.heartbeat_timeout = Duration::from_secs(2);
    })
    .await;
    let data = BallConfig {
        rows: 1000,
        ..BallConfig::tutorial(11)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..spec(&dataset, 11)
        })
        .await;
    let (epochs, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    assert!(
        epochs.iter().all(|e| e.workers == 2),
        "a worker was dropped"
    );
    let ids: Vec<String> = tc
        .client
        .workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(
        ids,
        ["w-1", "w-2"],
        "the original workers, never dropped and rejoined"
    );
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_leave_are_counted_by_cause() {
    let mut tc = TestCluster::start(3).await;
    tc.wait_for_workers(3).await;
    tc.cluster.stop_worker(0).await;
    tc.cluster.kill_worker(1);
    let client = &mut tc.client;
    recur_tests::wait_for(30, "two workers to be gone", async || {
        client.workers().await.unwrap().len() == 1
    })
    .await;
    let body = recur_tests::scrape_metrics(tc.cluster.addr()).await;
    let gone = |cause: &str| {
        recur_tests::labelled_metric(
            &body,
            "recur_workers_gone_total",
            &[("cause", cause), ("device", "cpu")],
        )
    };
    assert_eq!(gone("left"), Some(1.0), "{body}");
    assert_eq!(
        gone("lost"),
        Some(1.0),
        "a goodbye is not also a loss:\n{body}"
    );
    assert_eq!(gone("dropped"), None, "{body}");
    assert_eq!(recur_tests::metric(&body, "recur_workers"), Some(1.0));
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tuned_job_starts_from_its_own_copy_even_after_a_restart_and_its_source_deleted() {
    use recur_client::local::LocalCluster;
    let dir = tempfile::tempdir().unwrap();
    let config = || CoordinatorConfig::new(dir.path().join("data"));
    let histories = vec![
        vec![1.0, 3.0, 5.0],
        vec![-4.0, -2.0],
        vec![7.0, 3.0, -1.0, -5.0],
    ];
    let mut first = LocalCluster::start("127.0.0.1:0", config(), 2)
        .await
        .unwrap();
    let mut client = recur_client::Client::connect(&first.url(), None)
        .await
        .unwrap();
    let dataset = recur_tests::upload_ball(&mut client, 1500, 21).await;
    let source = client
        .submit(pb::JobSpec {
            max_epochs: 3,
            ..spec(&dataset, 21)
        })
        .await
        .unwrap()
        .job_id;
    let (_, info) = recur_tests::follow(&mut client, &source).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    let expected = client
        .predict(&source, histories.clone())
        .await
        .unwrap()
        .predictions;
    // No workers: the fine-tuned job cannot start before the restart.
    first.stop_worker(0).await;
    first.stop_worker(1).await;
    let tuned = client
        .submit(pb::JobSpec {
            init_from: source.clone(),
            max_epochs: 1,
            optimizer: Some(pb::OptimizerSpec {
                kind: pb::optimizer_spec::Kind::Sgd as i32,
                lr: Some(1e-12),
                ..Default::default()
            }),
            ..spec(&dataset, 5)
        })
        .await
        .unwrap()
        .job_id;
    client.delete_job(&source).await.unwrap();
    first.shutdown().await.unwrap();

    let second = LocalCluster::start("127.0.0.1:0", config(), 2)
        .await
        .unwrap();
    let mut client = recur_client::Client::connect(&second.url(), None)
        .await
        .unwrap();
    let (_, info) = recur_tests::follow(&mut client, &tuned).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    // A near-zero learning rate: the tuned model answers as its source did, which a fresh
    // initialisation (seed 5) would not.
    let got = client.predict(&tuned, histories).await.unwrap().predictions;
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-3, "{got:?} vs {expected:?}");
    }
    assert!(
        client.job(&source).await.is_err(),
        "the source stays deleted"
    );
    second.shutdown().await.unwrap();
}
