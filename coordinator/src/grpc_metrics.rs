//! A tower layer that counts the coordinator's gRPC calls by service, method and status code,
//! and times them, for `/metrics`.
//!
//! The status of a call is where gRPC puts it: in the response headers when the call fails
//! before any message (a "trailers-only" response: refused tokens, bad arguments), otherwise in
//! the trailers that end the body. A call dropped before its status (the client went away, or
//! its deadline passed) counts as `Cancelled`. Only the methods of the services served get their
//! own labels (taken from their descriptor sets); any other path counts as `other`, so callers
//! cannot grow the label set.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus::{HistogramVec, IntCounterVec};
use prost::Message;

/// Adds [`GrpcMetrics`] to a service.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    calls: IntCounterVec,
    seconds: HistogramVec,
    /// `/package.Service/Method` of every method served.
    methods: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    /// Counts into `calls` (labels `service`, `method`, `code`) and times into `seconds`
    /// (labels `service`, `method`); the methods of the services in `descriptor_sets` (encoded
    /// `FileDescriptorSet`s) get their own labels.
    pub fn new(
        calls: IntCounterVec,
        seconds: HistogramVec,
        descriptor_sets: &[&[u8]],
    ) -> Result<Self, prost::DecodeError> {
        let mut methods = HashSet::new();
        for set in descriptor_sets {
            for file in prost_types::FileDescriptorSet::decode(*set)?.file {
                for service in &file.service {
                    for method in &service.method {
                        methods.insert(format!(
                            "/{}.{}/{}",
                            file.package(),
                            service.name(),
                            method.name()
                        ));
                    }
                }
            }
        }
        Ok(Self {
            calls,
            seconds,
            methods: Arc::new(methods),
        })
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

/// One call being measured. It records itself once: with the status it ended with, or as
/// `Cancelled` when dropped before one arrived.
#[derive(Debug)]
struct Call {
    service: String,
    method: String,
    start: Instant,
    layer: GrpcMetricsLayer,
    recorded: bool,
}

impl Call {
    fn record(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
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

impl Drop for Call {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// The call's service and method labels (`recur.v1.Recur`, `SubmitJob`) when `path` is a method
/// in `methods`, else `other`.
fn labels(path: &str, methods: &HashSet<String>) -> (String, String) {
    match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if methods.contains(path) => {
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
            let (service, method) = labels(request.uri().path(), &self.layer.methods);
            Call {
                service,
                method,
                start: Instant::now(),
                layer: self.layer.clone(),
                recorded: false,
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
                // A trailers-only response: the status is in the headers.
                if let (Some(code), Some(call)) = (status_of(response.headers()), call.as_mut()) {
                    call.record(code);
                }
                Ok(response.map(|inner| MeteredBody { inner, call }))
            }
            Err(e) => {
                if let Some(call) = call.as_mut() {
                    call.record(tonic::Code::Unknown);
                }
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that records its call's status from its trailers (or as `Cancelled`
    /// when dropped before them).
    #[derive(Debug)]
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
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
        if let Some(call) = this.call.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(code) = f.trailers_ref().and_then(status_of) {
                        call.record(code);
                    }
                }
                // A body that fails or ends without trailers carries no status.
                Some(Err(_)) | None => call.record(tonic::Code::Unknown),
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
    use super::*;

    #[test]
    fn labels_name_the_methods_served_and_lump_the_rest() {
        let layer = GrpcMetricsLayer::new(
            IntCounterVec::new(
                prometheus::Opts::new("c", "c"),
                &["service", "method", "code"],
            )
            .unwrap(),
            HistogramVec::new(
                prometheus::HistogramOpts::new("s", "s"),
                &["service", "method"],
            )
            .unwrap(),
            &[recur_proto::FILE_DESCRIPTOR_SET],
        )
        .unwrap();
        let label = |path| labels(path, &layer.methods);
        assert_eq!(
            label("/recur.v1.Recur/SubmitJob"),
            ("recur.v1.Recur".into(), "SubmitJob".into())
        );
        assert_eq!(
            label("/recur.v1.Workers/Join"),
            ("recur.v1.Workers".into(), "Join".into())
        );
        for path in [
            "/",
            "/metrics",
            "/evil.Service/X",
            "/recur.v1.Recur/",
            "/recur.v1.Recur/NoSuchMethod",
            "/recur.v1.Recur/SubmitJob/x",
        ] {
            assert_eq!(label(path), ("other".into(), "other".into()), "{path}");
        }
    }
}
