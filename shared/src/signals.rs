//! Shutdown signals: SIGTERM and SIGINT both mean "shut down gracefully".

use tokio::signal::unix::{signal, SignalKind};

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
