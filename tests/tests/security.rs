//! Tokens and TLS: who may call what, and encrypted end-to-end training.

use std::time::Duration;

use recur_client::Client;
use recur_coordinator::auth::Secret;
use recur_proto::v1 as pb;
use recur_tests::{TestCluster, spec, state};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

const CLIENT: &str = "client-secret";
const WORKER: &str = "worker-secret";

/// Calls every client RPC with `token`; returns each one's status code (None = success).
async fn every_rpc(url: &str, token: Option<&str>) -> Vec<(&'static str, Option<Code>)> {
    let mut c = Client::connect(url, token).await.unwrap();
    let code = |r: Result<(), recur_client::ClientError>| {
        r.err().map(|e| e.code().unwrap_or(Code::Unknown))
    };
    vec![
        (
            "UploadDataset",
            code(
                c.upload("x.csv", b"1,2\n3,4\n5,6\n".to_vec(), |_| {})
                    .await
                    .map(|_| ()),
            ),
        ),
        (
            "SubmitJob",
            code(c.submit(spec(&"a".repeat(64), 1)).await.map(|_| ())),
        ),
        ("GetJob", code(c.job("job-1").await.map(|_| ()))),
        ("ListJobs", code(c.jobs().await.map(|_| ()))),
        ("CancelJob", code(c.cancel("job-1").await.map(|_| ()))),
        ("WatchJob", code(c.watch("job-1").await.map(|_| ()))),
        (
            "GetCheckpoint",
            code(c.checkpoint("job-1", false).await.map(|_| ())),
        ),
        ("ListWorkers", code(c.workers().await.map(|_| ()))),
        ("GetSteps", code(c.steps("job-1").await.map(|_| ()))),
        (
            "Predict",
            code(c.predict("job-1", vec![vec![1.0]]).await.map(|_| ())),
        ),
        ("ListDatasets", code(c.datasets().await.map(|_| ()))),
        (
            "DeleteDataset",
            code(c.delete_dataset(&"a".repeat(64)).await.map(|_| ())),
        ),
        ("DeleteJob", code(c.delete_job("job-1").await.map(|_| ()))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rpcs_need_the_client_token_and_workers_the_worker_token() {
    let tc = TestCluster::start_with(0, |c| {
        c.client_token = Some(Secret::new(CLIENT));
        c.worker_token = Some(Secret::new(WORKER));
    })
    .await;
    let url = tc.cluster.url();
    for (token, expected) in [
        (None, Code::Unauthenticated),
        (Some("wrong"), Code::Unauthenticated),
        (Some(WORKER), Code::PermissionDenied),
    ] {
        for (rpc, code) in every_rpc(&url, token).await {
            assert_eq!(code, Some(expected), "{rpc} with {token:?}");
        }
    }
    // With the client token every call gets past the check (to its own answer).
    for (rpc, code) in every_rpc(&url, Some(CLIENT)).await {
        assert!(
            !matches!(code, Some(Code::Unauthenticated | Code::PermissionDenied)),
            "{rpc}: {code:?}"
        );
    }
    // Every call is counted by method and status, refusals (headers only) as well as answers
    // (status in the trailers).
    let body = recur_tests::scrape_metrics(tc.cluster.addr()).await;
    let calls = |method: &str, code: &str| {
        recur_tests::metric(
            &body,
            &format!(
                "recur_grpc_requests_total{{code=\"{code}\",method=\"{method}\",service=\"recur.v1.Recur\"}}"
            ),
        )
    };
    assert_eq!(calls("ListJobs", "Unauthenticated"), Some(2.0), "{body}");
    assert_eq!(calls("ListJobs", "PermissionDenied"), Some(1.0), "{body}");
    assert_eq!(calls("ListJobs", "OK"), Some(1.0), "{body}");
    assert_eq!(calls("GetJob", "NotFound"), Some(1.0), "{body}");
    assert_eq!(calls("DeleteDataset", "NotFound"), Some(1.0), "{body}");
    // Health stays open.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    // A worker with the client token, or none, is turned away.
    for (token, expected) in [
        (Some(CLIENT), Code::PermissionDenied),
        (None, Code::Unauthenticated),
    ] {
        let mut raw = pb::workers_client::WorkersClient::new(channel.clone());
        let mut req = tonic::Request::new(tokio_stream::iter(vec![pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                protocol_version: recur_coordinator::PROTOCOL_VERSION,
                name: "x".into(),
                device: "cpu".into(),
                threads: 1,
            })),
        }]));
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        assert_eq!(raw.join(req).await.unwrap_err().code(), expected);
    }
    // The real worker with the worker token joins (the cluster gives it the token).
    let mut tc = tc;
    tc.cluster.add_worker();
    tc.wait_for_workers(1).await;
    tc.shutdown().await;
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["recur-client".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca)
        .unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn client_tls(p: &Pki, with_identity: bool) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&p.ca))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(&p.client_cert, &p.client_key));
    }
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_trains_end_to_end_and_plaintext_fails_cleanly() {
    let p = pki();
    let server_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&p.server_cert, &p.server_key))
        .client_ca_root(Certificate::from_pem(&p.ca));
    let dir = tempfile::tempdir().unwrap();
    let mut config = recur_coordinator::CoordinatorConfig::new(dir.path().join("data"));
    config.tls = Some(server_tls);
    let mut cluster = recur_client::local::LocalCluster::start("127.0.0.1:0", config, 0)
        .await
        .unwrap();
    cluster.set_worker_tls(client_tls(&p, true));
    cluster.add_worker();
    cluster.add_worker();
    let url = cluster.url();
    assert!(url.starts_with("https://"));

    let mut client = Client::connect_with(&url, None, Some(client_tls(&p, true)))
        .await
        .unwrap();
    let dataset = recur_tests::upload_ball(&mut client, 600, 9).await;
    let job = client
        .submit(pb::JobSpec {
            max_epochs: 2,
            ..spec(&dataset, 9)
        })
        .await
        .unwrap()
        .job_id;
    let (_, info) = recur_tests::follow(&mut client, &job).await;
    assert_eq!(state(&info), pb::JobState::Completed, "{}", info.message);
    assert_eq!(client.workers().await.unwrap().len(), 2);

    // Plaintext to the TLS port fails, promptly.
    let plain = url.replace("https://", "http://");
    let attempt = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = Client::connect(&plain, None).await?;
        c.jobs().await
    })
    .await
    .expect("plaintext against TLS must fail, not hang");
    assert!(attempt.is_err());
    // TLS without a client certificate is refused by mutual TLS.
    let attempt = tokio::time::timeout(Duration::from_secs(10), async {
        let mut c = Client::connect_with(&url, None, Some(client_tls(&p, false))).await?;
        c.jobs().await
    })
    .await
    .expect("a missing client certificate must fail, not hang");
    assert!(attempt.is_err());
    cluster.shutdown().await.unwrap();
}
