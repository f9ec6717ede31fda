//! Stopping on a signal: Ctrl-C (SIGINT) or SIGTERM, which is what `docker stop`, Kubernetes
//! and systemd send. A worker stopped this way finishes its reply, says `Goodbye` and exits.

/// Completes on SIGINT or SIGTERM (SIGINT only where there is no SIGTERM).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
