//! Hostile and bad input: each case gets the right status code and a message naming the
//! problem, and the coordinator keeps serving.

use recur_core::data::BallConfig;
use recur_proto::v1 as pb;
use recur_proto::v1::recur_client::RecurClient;
use recur_tests::{TestCluster, spec, state};
use tokio::io::AsyncWriteExt;
use tonic::Code;

use pb::upload_dataset_request::Kind as Up;

fn header(total: u64) -> pb::UploadDatasetRequest {
    pb::UploadDatasetRequest {
        kind: Some(Up::Header(pb::UploadHeader {
            name: "bad.csv".into(),
            total_bytes: total,
            layout: pb::DatasetLayout::Rows as i32,
        })),
    }
}

fn chunk(offset: u64, data: &[u8]) -> pb::UploadDatasetRequest {
    pb::UploadDatasetRequest {
        kind: Some(Up::Chunk(pb::UploadChunk {
            offset,
            data: data.to_vec(),
        })),
    }
}

fn finish(sha: &str) -> pb::UploadDatasetRequest {
    pb::UploadDatasetRequest {
        kind: Some(Up::Finish(pb::UploadFinish { sha256: sha.into() })),
    }
}

fn sha(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_by_name_and_the_server_keeps_serving() {
    let mut tc = TestCluster::start_with(1, |c| {
        c.csv.max_bytes = 10_000;
        c.csv.max_row_len = 50;
        c.spec.max_params = 10_000;
        c.max_predict_rows = 5;
    })
    .await;
    let mut raw = RecurClient::connect(tc.cluster.url()).await.unwrap();

    // Uploads: (stream, code, words the message must contain).
    let file = |text: &[u8]| {
        vec![
            header(text.len() as u64),
            chunk(0, text),
            finish(&sha(text)),
        ]
    };
    let long_row = (0..60).map(|i| i.to_string()).collect::<Vec<_>>().join(",") + "\n";
    let good = b"1,2,3\n4,5,6\n7,8,9\n";
    let uploads: Vec<(&str, Vec<pb::UploadDatasetRequest>, Code, &str)> = vec![
        (
            "text",
            file(b"1,2\n1,abc\n"),
            Code::InvalidArgument,
            "bad.csv:2: value 2 `abc` is not a number",
        ),
        (
            "NaN",
            file(b"1,NaN\n"),
            Code::InvalidArgument,
            "bad.csv:1: value 2 `NaN` is not finite",
        ),
        (
            "inf",
            file(b"1,2\n3,4\ninf,1\n"),
            Code::InvalidArgument,
            "bad.csv:3: value 1 `inf` is not finite",
        ),
        (
            "empty row",
            file(b"1,2\n,,\n"),
            Code::InvalidArgument,
            "bad.csv:2: a line of only commas",
        ),
        (
            "one value",
            file(b"1,2\n7\n"),
            Code::InvalidArgument,
            "bad.csv:2: has 1 value",
        ),
        (
            "too long",
            file(long_row.as_bytes()),
            Code::InvalidArgument,
            "bad.csv:1: has 60 values, above the limit of 50",
        ),
        (
            "too big",
            vec![header(20_000)],
            Code::ResourceExhausted,
            "20000 bytes is above the upload limit of 10000",
        ),
        (
            "not UTF-8",
            file(b"1,2\n\xff\xfe\n"),
            Code::InvalidArgument,
            "bad.csv:2: not valid UTF-8",
        ),
        (
            "stops midway",
            vec![header(good.len() as u64), chunk(0, &good[..5])],
            Code::InvalidArgument,
            "stopped after 5 of 18 bytes",
        ),
        (
            "wrong offset",
            vec![
                header(good.len() as u64),
                chunk(0, &good[..5]),
                chunk(7, &good[7..]),
            ],
            Code::InvalidArgument,
            "chunk at offset 7, expected offset 5",
        ),
        (
            "wrong sha256",
            vec![
                header(good.len() as u64),
                chunk(0, good),
                finish(&"0".repeat(64)),
            ],
            Code::InvalidArgument,
            "sha256 mismatch",
        ),
        (
            "no header",
            vec![chunk(0, good)],
            Code::InvalidArgument,
            "first upload message must be a header",
        ),
    ];
    for (case, messages, code, words) in uploads {
        let err = raw
            .upload_dataset(tokio_stream::iter(messages))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{case}: {}", err.message());
        assert!(
            err.message().contains(words),
            "{case}: `{}` lacks `{words}`",
            err.message()
        );
    }

    // Job specs.
    let data = BallConfig {
        rows: 300,
        ..BallConfig::tutorial(1)
    }
    .generate()
    .unwrap();
    let dataset = tc.upload(&data).await;
    let model = |kind: i32, hidden: u32, layers: u32| {
        Some(pb::ModelConfig {
            kind,
            input_size: 1,
            hidden_size: hidden,
            num_layers: layers,
            bidirectional: false,
            output_size: 1,
            head: Default::default(),
        })
    };
    let lr = |v: f64| {
        Some(pb::OptimizerSpec {
            lr: Some(v),
            ..Default::default()
        })
    };
    let base = spec(&dataset, 1);
    let specs: Vec<(&str, pb::JobSpec, Code, &str)> = vec![
        (
            "hidden 0",
            pb::JobSpec {
                model: model(1, 0, 1),
                ..base.clone()
            },
            Code::InvalidArgument,
            "hidden_size must be at least 1",
        ),
        (
            "layers 0",
            pb::JobSpec {
                model: model(1, 8, 0),
                ..base.clone()
            },
            Code::InvalidArgument,
            "num_layers must be at least 1",
        ),
        (
            "lr 0",
            pb::JobSpec {
                optimizer: lr(0.0),
                ..base.clone()
            },
            Code::InvalidArgument,
            "lr must be a positive number",
        ),
        (
            "lr < 0",
            pb::JobSpec {
                optimizer: lr(-0.1),
                ..base.clone()
            },
            Code::InvalidArgument,
            "lr must be a positive number",
        ),
        (
            "lr NaN",
            pb::JobSpec {
                optimizer: lr(f64::NAN),
                ..base.clone()
            },
            Code::InvalidArgument,
            "lr must be a positive number",
        ),
        (
            "batch 0",
            pb::JobSpec {
                batch_size: Some(0),
                ..base.clone()
            },
            Code::InvalidArgument,
            "batch_size must be at least 1",
        ),
        (
            "unknown kind",
            pb::JobSpec {
                model: model(42, 8, 1),
                ..base.clone()
            },
            Code::InvalidArgument,
            "42 is not a known model kind",
        ),
        (
            "unknown dataset",
            spec(&"d".repeat(64), 1),
            Code::NotFound,
            "not found; upload it first",
        ),
        (
            "not a dataset id",
            spec("nope", 1),
            Code::InvalidArgument,
            "dataset_id `nope`",
        ),
        (
            "too many parameters",
            pb::JobSpec {
                model: model(3, 200, 1),
                ..base.clone()
            },
            Code::InvalidArgument,
            "parameters, above the limit of 10000",
        ),
    ];
    let err = raw
        .submit_job(pb::SubmitJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "missing spec");
    assert!(err.message().contains("spec is missing"));
    for (case, s, code, words) in specs {
        let err = tc.client.submit(s).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{case}: {err}");
        assert!(
            err.to_string().contains(words),
            "{case}: `{err}` lacks `{words}`"
        );
    }

    // Predictions.
    let job = tc
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..base.clone()
        })
        .await;
    let (_, info) = tc.follow(&job).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    let queued = tc.job_without_checkpoint(&dataset).await;
    type PredictCase<'a> = (&'a str, &'a str, Vec<Vec<f32>>, Code, &'a str);
    let predicts: Vec<PredictCase> = vec![
        (
            "empty row",
            job.as_str(),
            vec![vec![]],
            Code::InvalidArgument,
            "sequence 0: is empty",
        ),
        (
            "NaN",
            job.as_str(),
            vec![vec![1.0], vec![f32::NAN]],
            Code::InvalidArgument,
            "sequence 1: value 1 (NaN)",
        ),
        (
            "too long",
            job.as_str(),
            vec![vec![1.0; 5000]],
            Code::InvalidArgument,
            "has 5000 values, above the limit",
        ),
        (
            "too many rows",
            job.as_str(),
            vec![vec![1.0]; 6],
            Code::InvalidArgument,
            "6 sequences, above the limit of 5",
        ),
        (
            "unknown job",
            "job-404",
            vec![vec![1.0]],
            Code::NotFound,
            "no job job-404",
        ),
        (
            "no checkpoint",
            queued.as_str(),
            vec![vec![1.0]],
            Code::FailedPrecondition,
            "has no checkpoint yet",
        ),
    ];
    for (case, id, rows, code, words) in predicts {
        let err = tc.client.predict(id, rows).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{case}: {err}");
        assert!(
            err.to_string().contains(words),
            "{case}: `{err}` lacks `{words}`"
        );
    }

    // Garbage on the wire: raw bytes at the port, and a worker stream with an empty message.
    let mut socket = tokio::net::TcpStream::connect(tc.cluster.addr())
        .await
        .unwrap();
    socket
        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\x13garbage")
        .await
        .unwrap();
    drop(socket);
    let mut workers = pb::workers_client::WorkersClient::connect(tc.cluster.url())
        .await
        .unwrap();
    let err = workers
        .join(tokio_stream::iter(vec![pb::WorkerMessage { kind: None }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Still serving, and nothing else was affected.
    let again = tc
        .submit(pb::JobSpec {
            max_epochs: 1,
            ..base
        })
        .await;
    let (_, info) = tc.follow(&again).await;
    assert_eq!(state(&info), pb::JobState::Completed);
    assert_eq!(tc.client.workers().await.unwrap().len(), 1);
    assert_eq!(
        tc.client
            .predict(&job, vec![vec![1.0, 2.0]])
            .await
            .unwrap()
            .predictions
            .len(),
        1
    );
    tc.shutdown().await;
}
