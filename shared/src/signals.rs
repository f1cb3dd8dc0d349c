//! Shutdown signals: SIGTERM and SIGINT both mean "shut down gracefully".

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Waits for SIGTERM or SIGINT and returns the signal's name.
///
/// Errors if the signal handlers cannot be installed.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// A token cancelled at the first SIGTERM or SIGINT (logged). Must be called inside a tokio
/// runtime; if the handlers cannot be installed that is logged and the token never fires.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let on_signal = token.clone();
    tokio::spawn(async move {
        match shutdown_signal().await {
            Ok(signal) => {
                info!(signal, "shutdown requested");
                on_signal.cancel();
            }
            Err(e) => error!(error = %e, "cannot install signal handlers"),
        }
    });
    token
}
