//! Logging setup shared by the binaries: human-readable on a terminal, one JSON object a line
//! otherwise (under systemd). The filter comes from `USHER_LOG` (or `RUST_LOG`), default `info`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. Safe to call once per process.
pub fn init() {
    let filter = std::env::var("USHER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    if terminal || std::env::var_os("USHER_LOG_TEXT").is_some() {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
}
