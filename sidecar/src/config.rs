//! The sidecar's command line (clap, every flag also read from `USHER_SIDECAR_*`) and the
//! typed, validated [`Config`] built from it by a pure function.
//!
//! ```text
//! usher-sidecar --directory ADDR [--join-token TOKEN | --ca FILE --cert FILE --key FILE]
//!               [--join-address ADDR] [--listen ADDR] [--admin ADDR] [--state-dir DIR]
//!               [--queue-timeout D] [--max-queued N] [--instance-timeout D]
//!               [--connect-timeout D] [--header-read-timeout D] [--max-header-size BYTES]
//!               [--max-connections N] [--threads N]
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;
use usher_shared::enrolment::{TlsFlags, TlsSettings};
use usher_shared::names::validate_host_port;
use usher_shared::runtime;

/// The sidecar's flags as clap parses them; see [`Config::from_args`] for the checks.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "usher-sidecar",
    version,
    about = "Proxies a client's plain HTTP to healthy service instances, with a replica of the \
             usher directory's route table."
)]
pub struct Args {
    /// The directory's QUIC address, `host:port`.
    #[arg(long, env = "USHER_SIDECAR_DIRECTORY", value_name = "ADDR")]
    pub directory: String,

    /// How the node gets its certificate: `--join-token`, or `--ca/--cert/--key`
    /// (environment: see [`usher_shared::enrolment::tls_env`]).
    #[command(flatten)]
    pub tls: TlsFlags,

    /// The HTTP proxy address clients send to.
    #[arg(
        long,
        env = "USHER_SIDECAR_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:7410"
    )]
    pub listen: SocketAddr,

    /// Admin HTTP address (`/healthz`, `/v1/routes`).
    #[arg(
        long,
        env = "USHER_SIDECAR_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:7411"
    )]
    pub admin: SocketAddr,

    /// Where the last route table (`routes.json`) and the node certificate (`node.pem`,
    /// `node-key.pem`, `ca.pem`) are kept; created if missing.
    #[arg(
        long,
        env = "USHER_SIDECAR_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/usher/sidecar"
    )]
    pub state_dir: PathBuf,

    /// How long a request waits for a free instance before `503`.
    #[arg(long, env = "USHER_SIDECAR_QUEUE_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub queue_timeout: Duration,

    /// Requests that may wait per service version before `503 queue full`.
    #[arg(
        long,
        env = "USHER_SIDECAR_MAX_QUEUED",
        value_name = "N",
        default_value_t = 1000
    )]
    pub max_queued: usize,

    /// Time to an instance's response headers before `504`.
    #[arg(long, env = "USHER_SIDECAR_INSTANCE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub instance_timeout: Duration,

    /// Bound on a TCP connect to an instance.
    #[arg(long, env = "USHER_SIDECAR_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// A tunnel (a WebSocket, or any protocol switched to by a `101`) that carries no byte
    /// either way for this long is closed.
    #[arg(long, env = "USHER_SIDECAR_TUNNEL_IDLE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,

    /// A client must send a request's line and headers within this time, or its connection is
    /// closed (slow-loris defence).
    #[arg(long, env = "USHER_SIDECAR_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Largest request head (request line and headers) in bytes; a larger one is answered
    /// `431` and its connection closed.
    #[arg(
        long,
        env = "USHER_SIDECAR_MAX_HEADER_SIZE",
        value_name = "BYTES",
        default_value_t = DEFAULT_MAX_HEADER_SIZE
    )]
    pub max_header_size: usize,

    /// Client connections served at once; beyond it a new connection is accepted and closed
    /// at once until one ends.
    #[arg(
        long,
        env = "USHER_SIDECAR_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = DEFAULT_MAX_CONNECTIONS
    )]
    pub max_connections: usize,

    /// Worker threads of the proxy's runtime; `1` runs everything on one thread (no
    /// cross-thread wake-ups). Default: the number of CPUs.
    #[arg(long, env = "USHER_SIDECAR_THREADS", value_name = "N")]
    pub threads: Option<usize>,
}

/// Default `--max-header-size`, bytes: 64 KiB, 8 times nginx's default header buffer, far
/// above what browsers and HTTP clients send (a few KiB), far below what could hurt memory.
pub const DEFAULT_MAX_HEADER_SIZE: usize = 64 * 1024;

/// Bounds of `--max-header-size`, bytes. Below 1 KiB ordinary requests fail; above 256 KiB a
/// head is a memory attack, not a request (each connection buffers its head whole).
pub const MAX_HEADER_SIZE_RANGE: std::ops::RangeInclusive<usize> = 1024..=256 * 1024;

/// Default `--max-connections`: the client beside the sidecar needs a few dozen; each
/// connection costs a file descriptor (two while proxying), and the usual soft limit is 1024
/// per process, so 512 keeps the sidecar within it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// The sidecar's validated configuration. Tests build it directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The directory's QUIC address, `host:port` (resolved at each connect).
    pub directory: String,
    /// How the sidecar gets and renews its certificate.
    pub tls: TlsSettings,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    pub queue_timeout: Duration,
    pub max_queued: usize,
    pub instance_timeout: Duration,
    pub connect_timeout: Duration,
    /// Time a tunnel may carry nothing before it is closed.
    pub tunnel_idle_timeout: Duration,
    /// Time a client has to send a request head; then its connection is closed.
    pub header_read_timeout: Duration,
    /// Largest request head in bytes, within [`MAX_HEADER_SIZE_RANGE`]; larger gets `431`.
    pub max_header_size: usize,
    /// Client connections served at once, at least 1.
    pub max_connections: usize,
    /// Runtime worker threads, 1..=[`runtime::MAX_THREADS`]; 1 means a current-thread runtime.
    pub threads: usize,
}

/// A flag with a value the sidecar refuses; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("--{flag}{}: {reason}", if value.is_empty() { String::new() } else { format!(" {value}") })]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

fn positive(flag: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError {
            flag,
            value: "0s".into(),
            reason: "must be more than zero".into(),
        });
    }
    Ok(())
}

fn at_least_one(flag: &'static str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError {
            flag,
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

impl Config {
    /// Builds and validates the configuration from parsed flags. Pure.
    ///
    /// Errors name the flag: a directory address that is not `host:port`, a zero duration, a
    /// zero `--max-queued` or `--max-connections`, a `--max-header-size` outside
    /// [`MAX_HEADER_SIZE_RANGE`], a `--threads` outside 1..=[`runtime::MAX_THREADS`].
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        validate_host_port(&args.directory).map_err(|reason| ConfigError {
            flag: "directory",
            value: args.directory.clone(),
            reason,
        })?;
        let tls = args
            .tls
            .validate(&args.directory)
            .map_err(|e| ConfigError {
                flag: e.flag,
                value: String::new(),
                reason: e.reason,
            })?;
        positive("queue-timeout", args.queue_timeout)?;
        positive("instance-timeout", args.instance_timeout)?;
        positive("connect-timeout", args.connect_timeout)?;
        positive("tunnel-idle-timeout", args.tunnel_idle_timeout)?;
        positive("header-read-timeout", args.header_read_timeout)?;
        at_least_one("max-queued", args.max_queued)?;
        at_least_one("max-connections", args.max_connections)?;
        if !MAX_HEADER_SIZE_RANGE.contains(&args.max_header_size) {
            return Err(ConfigError {
                flag: "max-header-size",
                value: args.max_header_size.to_string(),
                reason: format!(
                    "must be between {} and {} bytes",
                    MAX_HEADER_SIZE_RANGE.start(),
                    MAX_HEADER_SIZE_RANGE.end()
                ),
            });
        }
        let threads = match args.threads {
            Some(n) => runtime::check_threads(n).map_err(|reason| ConfigError {
                flag: "threads",
                value: n.to_string(),
                reason,
            })?,
            None => runtime::threads_per_cpu(),
        };
        Ok(Self {
            directory: args.directory,
            tls,
            listen: args.listen,
            admin: args.admin,
            state_dir: args.state_dir,
            queue_timeout: args.queue_timeout,
            max_queued: args.max_queued,
            instance_timeout: args.instance_timeout,
            connect_timeout: args.connect_timeout,
            tunnel_idle_timeout: args.tunnel_idle_timeout,
            header_read_timeout: args.header_read_timeout,
            max_header_size: args.max_header_size,
            max_connections: args.max_connections,
            threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let args = [
            "usher-sidecar",
            "--directory",
            "127.0.0.1:7400",
            "--ca",
            "ca.pem",
        ]
        .iter()
        .chain(extra);
        let args = Args::try_parse_from(args).map_err(|e| e.to_string())?;
        Config::from_args(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7410".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:7411".parse().unwrap());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/usher/sidecar"));
        assert_eq!(c.queue_timeout, Duration::from_secs(30));
        assert_eq!(c.max_queued, 1000);
        assert_eq!(c.instance_timeout, Duration::from_secs(60));
        assert_eq!(c.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.max_header_size, 64 * 1024);
        assert_eq!(c.max_connections, 512);
        assert_eq!(c.threads, runtime::threads_per_cpu());
        assert_eq!(parse(&["--threads", "1"]).unwrap().threads, 1);
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (flags, named) in [
            (&["--queue-timeout", "0s"][..], "--queue-timeout"),
            (&["--queue-timeout", "later"][..], "--queue-timeout"),
            (&["--max-queued", "0"][..], "--max-queued"),
            (&["--instance-timeout", "0ms"][..], "--instance-timeout"),
            (&["--connect-timeout", "0s"][..], "--connect-timeout"),
            (&["--listen", "localhost"][..], "--listen"),
            (
                &["--header-read-timeout", "0s"][..],
                "--header-read-timeout",
            ),
            (&["--max-header-size", "100"][..], "--max-header-size"),
            (&["--max-header-size", "10000000"][..], "--max-header-size"),
            (&["--max-connections", "0"][..], "--max-connections"),
            (&["--threads", "0"][..], "--threads"),
            (&["--threads=-1"][..], "--threads"),
            (&["--threads", "many"][..], "--threads"),
            (&["--threads", "100000"][..], "--threads"),
        ] {
            let e = parse(flags).unwrap_err();
            assert!(e.contains(named), "{flags:?}: {e}");
        }
        let args =
            Args::try_parse_from(["usher-sidecar", "--directory", "nowhere", "--ca", "x"]).unwrap();
        let e = Config::from_args(args).unwrap_err().to_string();
        assert!(e.contains("--directory"), "{e}");
    }
}
