//! The series layout end to end: a CSV with a header uploaded as a series, cut into windows of
//! several features by the coordinator, trained by workers, served from raw values.

use candle_core::Device;
use recur_core::checkpoint::Manifest;
use recur_core::data::{
    CsvLimits, Missing, Normalizer, Prepared, Scale, SeriesConfig, SeriesSpec, SplitFractions,
    Windows, cut_windows,
};
use recur_core::model::{HeadLayers, ModelConfig, ModelKind, SeqModel};
use recur_core::step::{Batch, Loss, predict};
use recur_core::train::{TrainConfig, Trainer};
use recur_proto::v1 as pb;
use recur_tests::{TestCluster, assert_params_close, checkpoint, state};

const FEATURES: [&str; 2] = ["temp", "demand"];

fn series_text() -> String {
    SeriesConfig {
        steps: 600,
        seed: 3,
        missing_per_mille: 10,
    }
    .to_csv()
}

fn wire_series() -> pb::SeriesSpec {
    pb::SeriesSpec {
        features: FEATURES.map(String::from).to_vec(),
        targets: vec!["demand".into()],
        window: 7,
        stride: 1,
        horizon: 1,
        drop_missing: true,
        order_by: "date".into(),
        column_scales: [("temp".to_string(), 10.0)].into(),
        ..Default::default()
    }
}

/// The same settings as [`wire_series`], as recur-core takes them.
fn core_series() -> SeriesSpec {
    SeriesSpec {
        features: FEATURES.map(String::from).to_vec(),
        targets: vec!["demand".into()],
        window: 7,
        stride: 1,
        horizon: 1,
        missing: Missing::Drop,
        order_by: Some("date".into()),
        column_scales: vec![recur_core::data::ColumnScale {
            column: "temp".into(),
            scale: 10.0,
        }],
        label: None,
        every_step: false,
    }
}

fn model() -> ModelConfig {
    ModelConfig {
        kind: ModelKind::Gru,
        input_size: 2,
        hidden_size: 8,
        num_layers: 1,
        bidirectional: false,
        output_size: 1,
        head: Default::default(),
    }
}

fn job(dataset: &str, seed: u64) -> pb::JobSpec {
    pb::JobSpec {
        name: "series".into(),
        dataset_id: dataset.to_string(),
        seed,
        batch_size: Some(32),
        // Sizes unset: the coordinator takes them from the columns.
        model: Some(pb::ModelConfig {
            input_size: 0,
            output_size: 0,
            head: Default::default(),
            ..(&model()).into()
        }),
        series: Some(wire_series()),
        ..Default::default()
    }
}

async fn upload_series(tc: &mut TestCluster, text: &str) -> String {
    tc.client
        .upload_as(
            "days.csv",
            text.as_bytes().to_vec(),
            pb::DatasetLayout::Series,
            |_| {},
        )
        .await
        .unwrap()
        .dataset_id
}

/// One process's parameters after the first `steps` batches of 32 windows (the test model).
fn one_process(
    windows: &Windows,
    norm: &Normalizer,
    seed: u64,
    loss: Loss,
    steps: usize,
) -> Vec<f32> {
    one_process_with(windows, norm, seed, loss, steps, model(), 0.0)
}

/// [`one_process`] with a given model and head dropout.
fn one_process_with(
    windows: &Windows,
    norm: &Normalizer,
    seed: u64,
    loss: Loss,
    steps: usize,
    model: ModelConfig,
    dropout: f32,
) -> Vec<f32> {
    let mut trainer = Trainer::with_split(
        TrainConfig {
            model,
            batch_size: 32,
            seed,
            scale: Scale::Standard,
            loss,
            dropout,
            ..TrainConfig::default()
        },
        &windows.data,
        windows.split.clone(),
        norm.clone(),
        &Device::Cpu,
    )
    .unwrap();
    let batches = trainer.next_epoch_batches();
    assert!(batches.len() > steps);
    for rows in batches.iter().take(steps) {
        trainer.train_step(rows).unwrap();
    }
    trainer.params().to_vec()
}

/// The model's outputs (its own units: normalised values or logits) for raw histories of two
/// features, through a downloaded checkpoint.
fn local_outputs(
    manifest: &Manifest,
    params: &[f32],
    norm: &Normalizer,
    histories: &[Vec<f32>],
) -> Vec<f32> {
    let model = SeqModel::new(
        recur_core::model::Params::from_flat(manifest.model, params, &Device::Cpu).unwrap(),
    );
    let scaled: Vec<Vec<f32>> = histories.iter().map(|h| norm.inputs(h)).collect();
    let inputs: Vec<&[f32]> = scaled.iter().map(Vec::as_slice).collect();
    predict(
        &model,
        &Batch::from_inputs(&inputs, 2, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_a_series_like_one_process_and_predict_from_raw_values() {
    let text = series_text();
    let windows = cut_windows(
        text.as_bytes(),
        "days.csv",
        &core_series(),
        SplitFractions::default(),
        &CsvLimits::default(),
    )
    .unwrap();
    assert!(windows.dropped > 0, "the file should have missing cells");
    let reference = Prepared::series(&windows, Scale::Standard, Loss::Mse).unwrap();

    let mut tc = TestCluster::start(2).await;
    let dataset = upload_series(&mut tc, &text).await;
    let listed = tc.client.datasets().await.unwrap();
    let stats = listed[0].stats.clone().unwrap();
    assert_eq!(stats.layout, pb::DatasetLayout::Series as i32);
    assert_eq!(stats.columns, ["date", "temp", "demand", "price"]);
    assert_eq!(stats.rows, 600);

    // Eight steps (all in the first epoch) on two workers equal one process's.
    let id = tc
        .submit(pb::JobSpec {
            max_steps: 8,
            ..job(&dataset, 2)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let (manifest, cluster) = checkpoint(&mut tc.client, &id, true).await;
    assert_eq!(manifest.model, model());
    let trainer = one_process(&windows, &reference.norm, 2, Loss::Mse, 8);
    assert_params_close(&cluster, &trainer, "2 workers vs recur-core");

    // A job with epochs has a best checkpoint, whose normalisation (fitted on the training
    // windows only; temp's fixed /10) is stored and applied to raw histories by Predict.
    let id = tc
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..job(&dataset, 4)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let (manifest, params) = checkpoint(&mut tc.client, &id, false).await;
    assert_eq!(manifest.normalizer.as_ref(), Some(&reference.norm));
    assert_eq!(reference.norm.inputs[0].scale, 10.0);
    assert_eq!(reference.norm.inputs[0].shift, 0.0);
    assert!(
        reference.norm.inputs[1].shift > 50.0,
        "demand is standardised"
    );
    let histories = test_histories(&reference, &windows, 4);
    let answer = tc
        .client
        .predict(&id, histories.clone())
        .await
        .unwrap()
        .predictions;
    let local = reference.norm.outputs(&local_outputs(
        &manifest,
        &params,
        &reference.norm,
        &histories,
    ));
    assert_eq!(answer.len(), 4);
    for (a, b) in answer.iter().zip(&local) {
        assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
    }
    // Half a step is not a step.
    let err = tc
        .client
        .predict(&id, vec![vec![20.0, 100.0, 21.0]])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert!(
        err.to_string()
            .contains("sequence 0 has 3 values; the model takes steps of 2 features"),
        "{err}"
    );
    tc.shutdown().await;
}

/// A stateful job through the wire: two workers over tonic train the series in two streams of
/// consecutive 10-day windows, each carrying its state, and end where one process does: the same
/// best parameters, validation history and test metrics (the test part run as one stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_a_series_statefully_like_one_process() {
    let text = series_text();
    let series = pb::SeriesSpec {
        window: 10,
        stride: 10,
        every_step: true,
        stateful: 2,
        ..wire_series()
    };
    let spec = SeriesSpec {
        window: 10,
        stride: 10,
        every_step: true,
        ..core_series()
    };
    let windows = cut_windows(
        text.as_bytes(),
        "days.csv",
        &spec,
        SplitFractions::default(),
        &CsvLimits::default(),
    )
    .unwrap();
    let reference = Prepared::series(&windows, Scale::Standard, Loss::Mse).unwrap();
    let report = Trainer::with_split(
        TrainConfig {
            model: model(),
            batch_size: 32,
            seed: 5,
            scale: Scale::Standard,
            max_epochs: 3,
            stateful: 2,
            ..TrainConfig::default()
        },
        &windows.data,
        reference.split.clone(),
        reference.norm.clone(),
        &Device::Cpu,
    )
    .unwrap()
    .run(|_| std::ops::ControlFlow::Continue(()))
    .unwrap();

    let mut tc = TestCluster::start(2).await;
    let dataset = upload_series(&mut tc, &text).await;
    let id = tc
        .submit(pb::JobSpec {
            max_epochs: 3,
            series: Some(series),
            ..job(&dataset, 5)
        })
        .await;
    let (epochs, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let stored = tc.client.job(&id).await.unwrap().spec.unwrap();
    assert_eq!(
        stored.series.map(|s| s.stateful),
        Some(2),
        "the spec keeps its streams"
    );
    assert_eq!(epochs.len(), 3);
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
            "{what}: {a} vs {b}"
        );
    };
    for (e, r) in epochs.iter().zip(&report.history) {
        let v = e.validation.unwrap();
        assert_eq!(v.samples, r.validation.samples as u64);
        close(v.mae, r.validation.mae, "validation MAE");
        close(e.train_loss, r.train_loss, "training loss");
    }
    assert_eq!(info.best_epoch, report.best_epoch);
    let test = info.test.unwrap();
    assert_eq!(test.samples, report.test.samples as u64);
    close(test.mae, report.test.mae, "test MAE");
    close(test.accuracy, report.test.accuracy, "test accuracy");
    let (_, params) = checkpoint(&mut tc.client, &id, false).await;
    // Over a hundred steps of two parts added in another order than one process's batch: a
    // floor of 1e-6 rather than assert_params_close's 1e-7 for parameters near zero.
    assert_eq!(params.len(), report.best.params.len());
    for (k, (a, b)) in params.iter().zip(&report.best.params).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(0.1),
            "stateful, 2 workers vs one process: parameter {k}: {a} vs {b}"
        );
    }
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_mistakes_are_refused_naming_file_line_and_column() {
    let mut tc = TestCluster::start(1).await;
    let text = series_text();
    let dataset = upload_series(&mut tc, &text).await;
    let refused = async |tc: &mut TestCluster, spec: pb::JobSpec, code, wanted: &str| {
        let err = tc.client.submit(spec).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(err.to_string().contains(wanted), "`{err}` lacks `{wanted}`");
    };
    let with = |change: fn(&mut pb::SeriesSpec)| {
        let mut spec = job(&dataset, 1);
        if let Some(s) = spec.series.as_mut() {
            change(s);
        }
        spec
    };
    use tonic::Code::{AlreadyExists, InvalidArgument};
    // A stateful job needs consecutive windows with a target at every step, a unidirectional
    // model and no dropout.
    refused(
        &mut tc,
        with(|s| s.stateful = 2),
        InvalidArgument,
        "series.stateful needs every_step",
    )
    .await;
    refused(
        &mut tc,
        with(|s| {
            s.stateful = 2;
            s.every_step = true;
        }),
        InvalidArgument,
        "series.stateful needs stride equal to window (consecutive windows, each continuing the \
         one before); got window 7 and stride 1",
    )
    .await;
    let mut bidirectional = with(|s| {
        s.stateful = 2;
        s.every_step = true;
        s.stride = 7;
    });
    if let Some(m) = bidirectional.model.as_mut() {
        m.bidirectional = true;
    }
    refused(
        &mut tc,
        bidirectional,
        InvalidArgument,
        "series.stateful needs a unidirectional model",
    )
    .await;
    refused(
        &mut tc,
        with(|s| {
            s.features[0] = "tmp".into();
            s.column_scales.clear();
        }),
        InvalidArgument,
        "days.csv:1: no column `tmp` in the header (date,temp,demand,price)",
    )
    .await;
    refused(
        &mut tc,
        with(|s| {
            s.features[0] = "date".into();
            s.column_scales.clear();
        }),
        InvalidArgument,
        "days.csv:2: column date: `2020-01-01` is not a number",
    )
    .await;
    refused(
        &mut tc,
        with(|s| s.drop_missing = false),
        InvalidArgument,
        "missing value",
    )
    .await;
    refused(
        &mut tc,
        with(|s| s.window = 700),
        InvalidArgument,
        "window 700 steps is longer than the series'",
    )
    .await;
    refused(
        &mut tc,
        with(|s| s.horizon = 590),
        InvalidArgument,
        "leaves no samples",
    )
    .await;
    refused(
        &mut tc,
        with(|s| s.targets.clear()),
        InvalidArgument,
        "targets name at least one column",
    )
    .await;
    let mut spec = job(&dataset, 1);
    spec.model = Some(pb::ModelConfig {
        input_size: 3,
        ..(&model()).into()
    });
    refused(
        &mut tc,
        spec,
        InvalidArgument,
        "model.input_size is 3, the series names 2 columns for it",
    )
    .await;
    let mut spec = job(&dataset, 1);
    spec.series = None;
    spec.model = None;
    refused(
        &mut tc,
        spec,
        InvalidArgument,
        "is a series: say which columns",
    )
    .await;

    // A rows dataset takes no series spec; the same bytes cannot be both.
    let rows = tc
        .client
        .upload("rows.csv", b"1,2,3\n2,3,4\n3,4,5\n".to_vec(), |_| {})
        .await
        .unwrap()
        .dataset_id;
    refused(
        &mut tc,
        job(&rows, 1),
        InvalidArgument,
        "was uploaded as rows",
    )
    .await;
    let err = tc
        .client
        .upload_as(
            "rows.csv",
            b"1,2,3\n2,3,4\n3,4,5\n".to_vec(),
            pb::DatasetLayout::Series,
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(AlreadyExists), "{err}");
    let err = tc
        .client
        .upload_as(
            "plain.csv",
            b"1,2\n3,4\n".to_vec(),
            pb::DatasetLayout::Series,
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(InvalidArgument), "{err}");
    assert!(
        err.to_string()
            .contains("plain.csv:1: header: is all numbers"),
        "{err}"
    );
    let err = tc
        .client
        .upload_as(
            "ragged.csv",
            b"a,b\n1,2\n3\n".to_vec(),
            pb::DatasetLayout::Series,
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("ragged.csv:3: has 1 fields, the header has 2"),
        "{err}"
    );
    // Nothing was queued by the refusals, and the coordinator still trains the series.
    assert!(tc.client.jobs().await.unwrap().is_empty());
    let id = tc
        .submit(pb::JobSpec {
            max_steps: 2,
            ..job(&dataset, 1)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    tc.shutdown().await;
}

/// One-shot predictions of every prefix of `steps` (2 features per step).
async fn prefix_predictions(tc: &mut TestCluster, job: &str, steps: &[f32]) -> Vec<f32> {
    let prefixes: Vec<Vec<f32>> = (1..=steps.len() / 2)
        .map(|t| steps[..2 * t].to_vec())
        .collect();
    tc.client.predict(job, prefixes).await.unwrap().predictions
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3 * y.abs().max(1.0),
            "{what}: step {k}: {x} vs {y}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_session_keeps_its_state_across_messages_and_streams() {
    let mut tc = TestCluster::start_with(1, |c| c.max_stream_sessions = 2).await;
    let dataset = upload_series(&mut tc, &series_text()).await;
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..job(&dataset, 6)
        })
        .await;
    let (_, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);

    // Twelve raw days of (temp, demand), fed 1, 4 and 5 at a time, then 2 on a new stream.
    let days: Vec<f32> = (0..12)
        .flat_map(|t| [18.0 + (t % 5) as f32, 95.0 + (t * 3 % 11) as f32])
        .collect();
    let whole = prefix_predictions(&mut tc, &job, &days).await;
    let mut session = tc.client.open_stream(&job).await.unwrap();
    let opened = session.opened().clone();
    assert_eq!(
        (
            opened.input_size,
            opened.output_size,
            opened.steps,
            opened.epoch
        ),
        (2, 1, 0, info.best_epoch)
    );
    let mut streamed = Vec::new();
    for (from, to) in [(0, 1), (1, 5), (5, 10)] {
        let answer = session.feed(days[2 * from..2 * to].to_vec()).await.unwrap();
        assert_eq!(answer.steps, to as u64);
        streamed.extend(answer.predictions);
    }
    assert_close(&streamed, &whole[..10], "streamed vs one-shot");

    // Half a step ends the stream and leaves the session as it was.
    let err = session.feed(vec![20.0, 100.0, 21.0]).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(
        err.to_string().contains("3 values are not whole steps"),
        "{err}"
    );
    // The session was put back before the error was sent: it resumes at once.
    let id = opened.session_id.clone();
    let mut session = tc.client.resume_stream(&id, None).await.unwrap();
    assert_eq!(session.opened().steps, 10);
    let answer = session.feed(days[20..].to_vec()).await.unwrap();
    assert_eq!(answer.steps, 12);
    assert_close(&answer.predictions, &whole[10..], "resumed vs one-shot");

    // Values beyond the upload limit are refused like Predict's (the session stays).
    let err = session.feed(vec![1e9, 100.0]).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(
        err.to_string()
            .contains("value 1 (1000000000) is not a finite number within"),
        "{err}"
    );
    // A session is resumed only on its own job (and is put back when refused).
    let err = tc
        .client
        .resume_stream(&id, Some("job-7"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("is on job-1, not job-7"), "{err}");
    let session = tc.client.resume_stream(&id, Some(&job)).await.unwrap();
    assert_eq!(session.opened().steps, 12);

    // Held by this stream: a second one is refused. One more session fits, a third does not.
    let err = tc.client.resume_stream(&id, None).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string().contains("in use by another stream"),
        "{err}"
    );
    let _second = tc.client.open_stream(&job).await.unwrap();
    let err = tc.client.open_stream(&job).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    let body = recur_tests::scrape_metrics(tc.cluster.addr()).await;
    assert_eq!(
        recur_tests::metric(&body, "recur_stream_sessions"),
        Some(2.0)
    );
    assert_eq!(
        recur_tests::metric(&body, "recur_stream_steps_total"),
        Some(12.0)
    );
    let err = tc.client.resume_stream("feedbeef", None).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    let err = tc.client.open_stream("job-99").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    session.close().await.unwrap();
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_stream_sessions_expire_and_bidirectional_models_cannot_stream() {
    let mut tc = TestCluster::start_with(1, |c| c.stream_idle = std::time::Duration::ZERO).await;
    let dataset = upload_series(&mut tc, &series_text()).await;
    let job_id = tc
        .submit(pb::JobSpec {
            max_epochs: 1,
            ..job(&dataset, 6)
        })
        .await;
    let (_, info) = tc.follow(&job_id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let mut session = tc.client.open_stream(&job_id).await.unwrap();
    session.feed(vec![20.0, 100.0]).await.unwrap();
    // Another open sweeps idle sessions; one held by a live stream is not idle.
    let other = tc.client.open_stream(&job_id).await.unwrap();
    assert_eq!(session.feed(vec![21.0, 99.0]).await.unwrap().steps, 2);
    other.close().await.unwrap();
    let id = session.opened().session_id.clone();
    session.close().await.unwrap();
    // Put back with no idle time allowed: gone as soon as its stream has ended.
    let err = tc.client.resume_stream(&id, None).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(err.to_string().contains("unknown or expired"), "{err}");

    let mut spec = job(&dataset, 6);
    spec.max_epochs = 1;
    if let Some(m) = spec.model.as_mut() {
        m.bidirectional = true;
    }
    let both = tc.submit(spec).await;
    let (_, info) = tc.follow(&both).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let err = tc.client.open_stream(&both).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition), "{err}");
    assert!(err.to_string().contains("bidirectional"), "{err}");
    tc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rises_label_trains_a_classifier_that_two_workers_and_one_process_agree_on() {
    let text = series_text();
    let mut tc = TestCluster::start(2).await;
    let dataset = upload_series(&mut tc, &text).await;
    let labelled = |seed| {
        let mut spec = job(&dataset, seed);
        if let Some(s) = spec.series.as_mut() {
            s.label = pb::LabelRule::Rises as i32;
        }
        spec
    };
    // The same steps on two workers and in one process (BCE, labels not normalised).
    let id = tc
        .submit(pb::JobSpec {
            max_steps: 6,
            ..labelled(3)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    assert_eq!(info.spec.as_ref().unwrap().loss, pb::Loss::Bce as i32);
    let (manifest, cluster) = checkpoint(&mut tc.client, &id, true).await;
    assert_eq!(manifest.loss, Loss::Bce);
    let mut series = core_series();
    series.label = Some(recur_core::data::Label::Rises);
    let windows = cut_windows(
        text.as_bytes(),
        "days.csv",
        &series,
        SplitFractions::default(),
        &CsvLimits::default(),
    )
    .unwrap();
    let reference = Prepared::series(&windows, Scale::Standard, Loss::Bce).unwrap();
    assert_eq!(
        reference.norm.targets[0],
        recur_core::data::Affine::divide(1.0)
    );
    let trainer = one_process(&windows, &reference.norm, 3, Loss::Bce, 6);
    assert_params_close(&cluster, &trainer, "2 workers vs recur-core (bce)");

    // Trained for a while, the weekly cycle makes "higher tomorrow" predictable.
    let id = tc
        .submit(pb::JobSpec {
            max_epochs: 40,
            ..labelled(3)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let test = info.test.unwrap();
    eprintln!(
        "rises: test accuracy {:.4}, precision {:.4}, recall {:.4}, loss {:.4}",
        test.accuracy, test.precision, test.recall, test.loss
    );
    assert!(test.accuracy > 0.8, "test accuracy {}", test.accuracy);
    assert!(test.precision > 0.7 && test.recall > 0.7, "{test:?}");
    assert_eq!(test.accuracy, test.exact);
    // Predict returns the probability of a rise.
    let histories = test_histories(&reference, &windows, 20);
    let probabilities = tc
        .client
        .predict(&id, histories.clone())
        .await
        .unwrap()
        .predictions;
    let (manifest, params) = checkpoint(&mut tc.client, &id, false).await;
    let logits = local_outputs(&manifest, &params, &reference.norm, &histories);
    assert_eq!(probabilities.len(), logits.len());
    for (p, x) in probabilities.iter().zip(&logits) {
        let sigmoid = 1.0 / (1.0 + (-x).exp());
        assert!(
            (p - sigmoid).abs() < 1e-5,
            "{p} vs sigmoid({x}) = {sigmoid}"
        );
    }
    assert!(probabilities.iter().any(|&p| p > 0.5) && probabilities.iter().any(|&p| p < 0.5));
    tc.shutdown().await;
}

/// The raw input steps of the first `n` test windows.
fn test_histories(reference: &Prepared, windows: &Windows, n: usize) -> Vec<Vec<f32>> {
    reference
        .split
        .test
        .iter()
        .take(n)
        .map(|&r| windows.data.input(r).to_vec())
        .collect()
}

/// The test model under a head of two hidden layers.
fn mlp_model() -> ModelConfig {
    ModelConfig {
        head: HeadLayers::new(&[12, 6]).unwrap(),
        ..model()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mlp_head_with_dropout_trains_alike_on_two_workers_and_one_process() {
    let text = series_text();
    let windows = cut_windows(
        text.as_bytes(),
        "days.csv",
        &core_series(),
        SplitFractions::default(),
        &CsvLimits::default(),
    )
    .unwrap();
    let reference = Prepared::series(&windows, Scale::Standard, Loss::Mse).unwrap();
    let mut tc = TestCluster::start(2).await;
    let dataset = upload_series(&mut tc, &text).await;
    let mlp = |seed| {
        let mut spec = job(&dataset, seed);
        if let Some(m) = spec.model.as_mut() {
            m.head = vec![12, 6];
        }
        spec.dropout = 0.3;
        spec
    };

    // Eight steps with dropout: the workers drop the units one process drops.
    let id = tc
        .submit(pb::JobSpec {
            max_steps: 8,
            ..mlp(5)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    assert_eq!(info.spec.as_ref().unwrap().dropout, 0.3);
    let (manifest, cluster) = checkpoint(&mut tc.client, &id, true).await;
    assert_eq!(manifest.model, mlp_model());
    let one = one_process_with(&windows, &reference.norm, 5, Loss::Mse, 8, mlp_model(), 0.3);
    assert_params_close(
        &cluster,
        &one,
        "2 workers vs recur-core (mlp head, dropout 0.3)",
    );
    // Dropout is on: without it the same steps end elsewhere.
    let plain = one_process_with(&windows, &reference.norm, 5, Loss::Mse, 8, mlp_model(), 0.0);
    let moved = cluster
        .iter()
        .zip(&plain)
        .filter(|(a, b)| (*a - *b).abs() > 1e-4)
        .count();
    assert!(moved > cluster.len() / 4, "only {moved} parameters moved");

    // Predictions run without dropout: they equal a plain forward pass of the checkpoint.
    let histories = test_histories(&reference, &windows, 6);
    let answer = tc
        .client
        .predict(&id, histories.clone())
        .await
        .unwrap()
        .predictions;
    let (manifest, params) = checkpoint(&mut tc.client, &id, true).await;
    let local = reference.norm.outputs(&local_outputs(
        &manifest,
        &params,
        &reference.norm,
        &histories,
    ));
    assert_close(&answer, &local, "predictions of the mlp head");

    // Settings that cannot work are refused before anything is queued.
    for (change, wanted) in [
        (
            (|s: &mut pb::JobSpec| s.model.as_mut().unwrap().head.clear()) as fn(&mut pb::JobSpec),
            "dropout acts between the head's hidden layers",
        ),
        (
            |s| s.dropout = 1.0,
            "dropout must be at least 0 and below 1, got 1",
        ),
        (
            |s| s.dropout = f32::NAN,
            "dropout must be at least 0 and below 1",
        ),
        (
            |s| s.model.as_mut().unwrap().head = vec![4, 4, 4, 4, 4],
            "has 5 hidden layers, above the limit 4",
        ),
        (
            |s| s.model.as_mut().unwrap().head = vec![4, 0],
            "hidden layer 2 has width 0",
        ),
    ] {
        let mut spec = mlp(1);
        change(&mut spec);
        let err = tc.client.submit(spec).await.unwrap_err();
        assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
        assert!(err.to_string().contains(wanted), "`{err}` lacks `{wanted}`");
    }
    assert_eq!(tc.client.jobs().await.unwrap().len(), 1);
    tc.shutdown().await;
}

/// Two targets at every step of each window, under an MLP head with dropout (a mask per step):
/// two workers train as one process does, and the test metrics the workers compute (every step
/// of every test window) are one process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_at_every_step_train_and_evaluate_alike_on_two_workers_and_one_process() {
    let text = series_text();
    let targets = ["demand", "temp"].map(String::from).to_vec();
    let series = SeriesSpec {
        targets: targets.clone(),
        every_step: true,
        ..core_series()
    };
    let windows = cut_windows(
        text.as_bytes(),
        "days.csv",
        &series,
        SplitFractions::default(),
        &CsvLimits::default(),
    )
    .unwrap();
    assert_eq!(windows.data.targets_per_row(), 7 * 2);
    assert_eq!(windows.data.outputs(), 2);
    let reference = Prepared::series(&windows, Scale::Standard, Loss::Mse).unwrap();
    let two_out = ModelConfig {
        output_size: 2,
        head: HeadLayers::new(&[8]).unwrap(),
        ..model()
    };
    let mut tc = TestCluster::start(2).await;
    let dataset = upload_series(&mut tc, &text).await;
    let every_step = |seed| {
        let mut spec = job(&dataset, seed);
        if let Some(s) = spec.series.as_mut() {
            s.targets.clone_from(&targets);
            s.every_step = true;
        }
        if let Some(m) = spec.model.as_mut() {
            m.head = vec![8];
        }
        spec.dropout = 0.2;
        spec
    };
    let id = tc
        .submit(pb::JobSpec {
            max_steps: 6,
            ..every_step(7)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    assert!(
        info.spec
            .as_ref()
            .unwrap()
            .series
            .as_ref()
            .unwrap()
            .every_step
    );
    let (manifest, cluster) = checkpoint(&mut tc.client, &id, true).await;
    assert_eq!(manifest.model, two_out);
    let one = one_process_with(&windows, &reference.norm, 7, Loss::Mse, 6, two_out, 0.2);
    assert_params_close(
        &cluster,
        &one,
        "2 workers vs recur-core (every step, 2 targets)",
    );

    let id = tc
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..every_step(8)
        })
        .await;
    let (_, info) = tc.follow(&id).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    let test = info.test.unwrap();
    let (manifest, params) = checkpoint(&mut tc.client, &id, false).await;
    let model = SeqModel::new(
        recur_core::model::Params::from_flat(manifest.model, &params, &Device::Cpu).unwrap(),
    );
    let mut acc = recur_core::metrics::MetricsAccumulator::default();
    for rows in reference.split.test.chunks(32) {
        let batch = Batch::from_rows(&reference.data, rows, &Device::Cpu).unwrap();
        acc.add_batch(
            &recur_core::step::evaluate(&model, &batch, &reference.norm.targets, Loss::Mse)
                .unwrap(),
        );
    }
    let local = acc.finish();
    assert_eq!(local.samples, reference.split.test.len() * 7 * 2);
    for (what, cluster, local) in [
        ("accuracy", test.accuracy, local.accuracy),
        ("mae", test.mae, local.mae),
        ("exact", test.exact, local.exact),
    ] {
        assert!(
            (cluster - local).abs() <= 1e-5 * local.abs().max(1.0),
            "test {what}: cluster {cluster} vs one process {local}"
        );
    }
    // Predict answers the last step's two targets, raw.
    let history = windows.data.input(reference.split.test[0]).to_vec();
    let answer = tc.client.predict(&id, vec![history.clone()]).await.unwrap();
    let local = reference.norm.outputs(&local_outputs(
        &manifest,
        &params,
        &reference.norm,
        &[history],
    ));
    assert_close(&answer.predictions, &local, "every-step model, last step");
    tc.shutdown().await;
}
