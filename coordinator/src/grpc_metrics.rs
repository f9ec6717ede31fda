//! A tower layer that counts the coordinator's gRPC calls by service, method and status code,
//! and times them, for `/metrics`.
//!
//! The status of a call is where gRPC puts it: in the response headers when the call fails
//! before any message (a "trailers-only" response: refused tokens, bad arguments), otherwise in
//! the trailers that end the body. A body dropped before its trailers (the client went away)
//! counts as `Cancelled`. Paths that are not one of the coordinator's services count under
//! `method="other"`, so random paths cannot grow the label set.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus::{HistogramVec, IntCounterVec};

/// The services whose methods get their own label.
const SERVICES: [&str; 5] = [
    "recur.v1.Recur",
    "recur.v1.Workers",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Adds [`GrpcMetrics`] to a service.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    calls: IntCounterVec,
    seconds: HistogramVec,
}

impl GrpcMetricsLayer {
    /// Counts into `calls` (labels `service`, `method`, `code`) and times into `seconds`
    /// (labels `service`, `method`).
    pub fn new(calls: IntCounterVec, seconds: HistogramVec) -> Self {
        Self { calls, seconds }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

/// One call being measured; records itself once.
#[derive(Debug)]
struct Call {
    service: String,
    method: String,
    start: Instant,
    layer: GrpcMetricsLayer,
}

impl Call {
    fn record(self, code: tonic::Code) {
        let code = match code {
            tonic::Code::Ok => "OK".to_string(),
            other => format!("{other:?}"),
        };
        let labels = [self.service.as_str(), self.method.as_str()];
        self.layer
            .calls
            .with_label_values(&[labels[0], labels[1], &code])
            .inc();
        self.layer
            .seconds
            .with_label_values(&labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// The call's service and method labels, from its path (`/recur.v1.Recur/SubmitJob`).
fn labels(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    match (parts.next(), parts.next()) {
        (Some(service), Some(method))
            if SERVICES.contains(&service)
                && !method.is_empty()
                && method.len() <= 64
                && method.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (service.to_string(), method.to_string())
        }
        _ => ("other".into(), "other".into()),
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let call = grpc.then(|| {
            let (service, method) = labels(request.uri().path());
            Call {
                service,
                method,
                start: Instant::now(),
                layer: self.layer.clone(),
            }
        });
        MeteredFuture {
            inner: self.inner.call(request),
            call,
        }
    }
}

pin_project! {
    /// The response future of [`GrpcMetrics`].
    #[derive(Debug)]
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, ResBody, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<MeteredBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(code) = status_of(response.headers())
                    && let Some(call) = call.take()
                {
                    call.record(code);
                }
                Ok(response.map(|inner| MeteredBody { inner, call }))
            }
            Err(e) => {
                if let Some(call) = call {
                    call.record(tonic::Code::Unknown);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that records its call's status from its trailers.
    #[derive(Debug)]
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.record(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(code) = f.trailers_ref().and_then(status_of)
                    && let Some(call) = this.call.take()
                {
                    call.record(code);
                }
            }
            Some(Err(_)) | None => {
                if let Some(call) = this.call.take() {
                    call.record(tonic::Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::labels;

    #[test]
    fn labels_name_known_methods_and_lump_the_rest() {
        assert_eq!(
            labels("/recur.v1.Recur/SubmitJob"),
            ("recur.v1.Recur".into(), "SubmitJob".into())
        );
        for path in [
            "/",
            "/metrics",
            "/evil.Service/X",
            "/recur.v1.Recur/",
            "/recur.v1.Recur/a/b",
        ] {
            assert_eq!(labels(path), ("other".into(), "other".into()), "{path}");
        }
    }
}
