//! The agent's command line (clap, every flag also read from `USHER_AGENT_*`) and the typed,
//! validated [`Config`] built from it by a pure function.
//!
//! ```text
//! usher-agent --directory ADDR --service NAME [--version V] --address ADDR
//!             [--join-token TOKEN | --ca FILE --cert FILE --key FILE] [--join-address ADDR]
//!             [--health http:PATH | grpc[:SERVICE] | tcp | none] [--concurrency N]
//!             [--admin ADDR]
//!             [--state-dir DIR] [-- COMMAND ARGS...]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;
use usher_shared::enrolment::{TlsFlags, TlsSettings};
pub use usher_shared::health::HealthSpec;
use usher_shared::names::{validate_host_port, validate_instance_id, validate_label, NameError};

/// The directory's batching period (SwarmKit: 100 changes or 100 ms): `--drain-time` must be
/// longer, so sidecars learn about `draining` before the instance goes away.
pub const DIRECTORY_BATCH_PERIOD: Duration = Duration::from_millis(100);

/// Most labels an instance may carry (they travel in every registration frame).
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 253;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 1024;

/// The agent's flags as clap parses them; see [`Config::from_args`] for the checks.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "usher-agent",
    // `--version` names the service version, so clap's own version flag is off.
    disable_version_flag = true,
    about = "Registers a service instance with the usher directory, health-checks it and \
             drains it on shutdown; optionally starts and supervises the instance itself."
)]
pub struct Args {
    /// The directory's QUIC address, `host:port`.
    #[arg(long, env = "USHER_AGENT_DIRECTORY", value_name = "ADDR")]
    pub directory: String,

    /// How the node gets its certificate: `--join-token`, or `--ca/--cert/--key`
    /// (environment: see [`usher_shared::enrolment::tls_env`]).
    #[command(flatten)]
    pub tls: TlsFlags,

    /// Service name (a DNS label).
    #[arg(long, env = "USHER_AGENT_SERVICE", value_name = "NAME")]
    pub service: String,

    /// Service version (a DNS label).
    #[arg(
        long,
        env = "USHER_AGENT_VERSION",
        value_name = "V",
        default_value = "v1"
    )]
    pub version: String,

    /// Where the instance serves HTTP (`ip:port`). May be omitted with `-- COMMAND`: the agent
    /// then picks a free loopback port.
    #[arg(long, env = "USHER_AGENT_ADDRESS", value_name = "ADDR")]
    pub address: Option<SocketAddr>,

    /// Health check: `http:PATH` (GET, 2xx passes), `grpc` or `grpc:SERVICE` (gRPC's
    /// grpc.health.v1 Check, SERVING passes), `tcp` (connect) or `none`.
    #[arg(
        long,
        env = "USHER_AGENT_HEALTH",
        value_name = "CHECK",
        default_value = "tcp"
    )]
    pub health: String,

    /// Time between health checks.
    #[arg(long, env = "USHER_AGENT_HEALTH_INTERVAL", value_name = "DURATION", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// How long one health check may take before it counts as failed.
    #[arg(long, env = "USHER_AGENT_HEALTH_TIMEOUT", value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive passing checks before the instance is `up`.
    #[arg(long, env = "USHER_AGENT_RISE", value_name = "N", default_value_t = 1)]
    pub rise: u32,

    /// Consecutive failing checks before an `up` instance becomes `unknown`.
    #[arg(long, env = "USHER_AGENT_FALL", value_name = "N", default_value_t = 2)]
    pub fall: u32,

    /// Requests the instance serves at once (its slots in every sidecar).
    #[arg(
        long,
        env = "USHER_AGENT_CONCURRENCY",
        value_name = "N",
        default_value_t = 8
    )]
    pub concurrency: u32,

    /// A label `KEY=VALUE` on the instance; repeatable (comma-separated in the environment).
    #[arg(
        long = "label",
        env = "USHER_AGENT_LABEL",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,

    /// Instance id; default `<hostname>-<service>-<version>-<8 random hex digits>`.
    #[arg(long, env = "USHER_AGENT_ID", value_name = "ID")]
    pub id: Option<String>,

    /// How long sidecars get to stop sending after `draining` is announced (must exceed the
    /// directory's 100 ms batch period).
    #[arg(long, env = "USHER_AGENT_DRAIN_TIME", value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub drain_time: Duration,

    /// How long the child gets between SIGTERM and SIGKILL.
    #[arg(long, env = "USHER_AGENT_STOP_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_timeout: Duration,

    /// Admin HTTP address (`/healthz`, `/v1/instance`).
    #[arg(
        long,
        env = "USHER_AGENT_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:7420"
    )]
    pub admin: SocketAddr,

    /// State directory (created if missing).
    #[arg(
        long,
        env = "USHER_AGENT_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/usher/agent"
    )]
    pub state_dir: PathBuf,

    /// The instance to start and supervise; `{port}` in its arguments becomes the port.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Where the instance listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSpec {
    /// Given with `--address`.
    Fixed(SocketAddr),
    /// Not given: the agent picks a free port on 127.0.0.1 for its child at startup.
    PickLoopbackPort,
}

/// The process the agent starts and supervises (`-- COMMAND ARGS...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildCommand {
    /// The program, looked up in `PATH` like a shell would.
    pub program: String,
    /// Its arguments; `{port}` is replaced by the instance's port.
    pub args: Vec<String>,
}

/// The agent's validated configuration. Tests build it directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The directory's QUIC address, `host:port` (resolved at each connect).
    pub directory: String,
    /// How the agent gets and renews its certificate.
    pub tls: TlsSettings,
    pub service: String,
    pub version: String,
    /// The instance id, stable for the agent's lifetime and across reconnects.
    pub id: String,
    pub address: AddressSpec,
    pub health: HealthSpec,
    /// Time between health checks.
    pub health_interval: Duration,
    /// Bound on one health check.
    pub health_timeout: Duration,
    /// Consecutive passes to become `up` (at least 1).
    pub rise: u32,
    /// Consecutive failures to leave `up` (at least 1).
    pub fall: u32,
    /// Slots per instance in each sidecar's reserver (at least 1).
    pub concurrency: u32,
    pub labels: BTreeMap<String, String>,
    /// Time between announcing `draining` and stopping the instance.
    pub drain_time: Duration,
    /// Time between SIGTERM and SIGKILL for the child.
    pub stop_timeout: Duration,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    /// The supervised instance, if the agent starts it.
    pub command: Option<ChildCommand>,
}

/// A flag with a value the agent refuses; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("--{flag} {value:?}: {source}")]
    Name {
        flag: &'static str,
        value: String,
        #[source]
        source: NameError,
    },
    #[error("--{flag}{}: {reason}", if value.is_empty() { String::new() } else { format!(" {value:?}") })]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("--address is required unless the agent starts the instance (-- COMMAND ARGS...)")]
    MissingAddress,
}

fn invalid(flag: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn label(flag: &'static str, value: &str) -> Result<(), ConfigError> {
    validate_label(value).map_err(|source| ConfigError::Name {
        flag,
        value: value.to_string(),
        source,
    })
}

impl Config {
    /// Builds and validates the configuration from parsed flags. `hostname` seeds the default
    /// instance id. Pure apart from the random id suffix.
    ///
    /// Errors name the offending flag: bad service/version names (DNS labels), a directory
    /// address without a port, a bad health spec, zero concurrency/rise/fall/interval, a drain
    /// time not above the directory's 100 ms batch period, malformed labels, or a missing
    /// `--address` without a command.
    pub fn from_args(args: Args, hostname: &str) -> Result<Self, ConfigError> {
        label("service", &args.service)?;
        label("version", &args.version)?;
        validate_directory(&args.directory)?;
        let tls = args
            .tls
            .validate(&args.directory)
            .map_err(|e| ConfigError::Invalid {
                flag: e.flag,
                value: String::new(),
                reason: e.reason,
            })?;

        let health =
            HealthSpec::parse(&args.health).map_err(|r| invalid("health", &args.health, r))?;
        if args.health_interval.is_zero() {
            return Err(invalid("health-interval", "0s", "must be more than zero"));
        }
        if args.health_timeout.is_zero() {
            return Err(invalid("health-timeout", "0s", "must be more than zero"));
        }
        if args.rise == 0 {
            return Err(invalid("rise", 0, "must be at least 1"));
        }
        if args.fall == 0 {
            return Err(invalid("fall", 0, "must be at least 1"));
        }
        if args.concurrency == 0 {
            return Err(invalid("concurrency", 0, "must be at least 1"));
        }
        if args.drain_time <= DIRECTORY_BATCH_PERIOD {
            return Err(invalid(
                "drain-time",
                humantime::format_duration(args.drain_time),
                "must be longer than the directory's 100ms batch period",
            ));
        }

        let labels = parse_labels(&args.labels)?;

        let command = match args.command.split_first() {
            None => None,
            Some((program, rest)) => {
                if program.is_empty() {
                    return Err(invalid("", program, "the command after -- is empty"));
                }
                Some(ChildCommand {
                    program: program.clone(),
                    args: rest.to_vec(),
                })
            }
        };
        let address = match (args.address, &command) {
            (Some(addr), _) => AddressSpec::Fixed(addr),
            (None, Some(_)) => AddressSpec::PickLoopbackPort,
            (None, None) => return Err(ConfigError::MissingAddress),
        };

        let id = match args.id {
            Some(id) => {
                validate_instance_id(&id).map_err(|source| ConfigError::Name {
                    flag: "id",
                    value: id.clone(),
                    source,
                })?;
                id
            }
            None => default_instance_id(hostname, &args.service, &args.version, rand::random()),
        };

        Ok(Config {
            directory: args.directory,
            tls,
            service: args.service,
            version: args.version,
            id,
            address,
            health,
            health_interval: args.health_interval,
            health_timeout: args.health_timeout,
            rise: args.rise,
            fall: args.fall,
            concurrency: args.concurrency,
            labels,
            drain_time: args.drain_time,
            stop_timeout: args.stop_timeout,
            admin: args.admin,
            state_dir: args.state_dir,
            command,
        })
    }
}

/// `host:port` with a non-empty host and a numeric port.
fn validate_directory(addr: &str) -> Result<(), ConfigError> {
    validate_host_port(addr).map_err(|reason| invalid("directory", addr, reason))
}

/// Parses `KEY=VALUE` labels: keys of visible ASCII, 1–253 bytes; values up to 1024 bytes
/// without control characters; at most 64 labels; a repeated key is refused.
fn parse_labels(raw: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    if raw.len() > MAX_LABELS {
        return Err(invalid(
            "label",
            format!("{} labels", raw.len()),
            format!("at most {MAX_LABELS} labels are allowed"),
        ));
    }
    let mut labels = BTreeMap::new();
    for item in raw {
        let Some((key, value)) = item.split_once('=') else {
            return Err(invalid("label", item, "expected KEY=VALUE"));
        };
        if key.is_empty() || key.len() > MAX_LABEL_KEY {
            return Err(invalid(
                "label",
                item,
                format!("the key must be 1 to {MAX_LABEL_KEY} bytes long"),
            ));
        }
        if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(invalid(
                "label",
                item,
                format!("the key contains {c:?}; only visible ASCII is allowed"),
            ));
        }
        if value.len() > MAX_LABEL_VALUE {
            return Err(invalid(
                "label",
                item,
                format!("the value is longer than {MAX_LABEL_VALUE} bytes"),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(invalid(
                "label",
                item,
                "the value contains a control character",
            ));
        }
        if labels.insert(key.to_string(), value.to_string()).is_some() {
            return Err(invalid(
                "label",
                item,
                format!("the key {key:?} is given twice"),
            ));
        }
    }
    Ok(labels)
}

/// `<hostname>-<service>-<version>-<8 hex digits>`. Characters of the host name that are not
/// visible ASCII become `-`, and the part before the suffix is cut so the id stays within 128
/// bytes.
pub fn default_instance_id(hostname: &str, service: &str, version: &str, suffix: u32) -> String {
    let host = match hostname.trim() {
        "" => "localhost",
        host => host,
    };
    // Anything but visible ASCII becomes `-`, so the id is valid and can be cut anywhere.
    let mut id: String = format!("{host}-{service}-{version}")
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '-' })
        .collect();
    // Keep within 128 bytes (all ASCII here), always ending with the random suffix.
    id.truncate(128 - 9);
    format!("{id}-{suffix:08x}")
}

/// This machine's host name (`localhost` if it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "usher-agent",
            "--directory",
            "127.0.0.1:7400",
            "--ca",
            "/tmp/ca.pem",
            "--service",
            "web",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| invalid("", "", e.to_string()))?;
        Config::from_args(args, "host1")
    }

    #[test]
    fn defaults() {
        let c = parse(&["--address", "127.0.0.1:8080"]).unwrap();
        assert_eq!(c.version, "v1");
        assert_eq!(c.concurrency, 8);
        assert_eq!(c.health, HealthSpec::Tcp);
        assert_eq!(c.health_interval, Duration::from_millis(500));
        assert_eq!(c.health_timeout, Duration::from_secs(1));
        assert_eq!((c.rise, c.fall), (1, 2));
        assert_eq!(c.drain_time, Duration::from_secs(1));
        assert_eq!(c.stop_timeout, Duration::from_secs(10));
        assert_eq!(c.admin, "127.0.0.1:7420".parse().unwrap());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/usher/agent"));
        assert_eq!(
            c.address,
            AddressSpec::Fixed("127.0.0.1:8080".parse().unwrap())
        );
        assert!(c.command.is_none());
        assert!(c.labels.is_empty());
        assert!(c.id.starts_with("host1-web-v1-"), "{}", c.id);
        assert_eq!(c.id.len(), "host1-web-v1-".len() + 8);
    }

    #[test]
    fn command_makes_address_optional() {
        let c = parse(&["--", "my-server", "--port", "{port}"]).unwrap();
        assert_eq!(c.address, AddressSpec::PickLoopbackPort);
        assert_eq!(
            c.command,
            Some(ChildCommand {
                program: "my-server".into(),
                args: vec!["--port".into(), "{port}".into()],
            })
        );
    }

    #[test]
    fn address_is_required_without_command() {
        let e = parse(&[]).unwrap_err();
        assert_eq!(e, ConfigError::MissingAddress);
        assert!(e.to_string().contains("--address"));
    }

    #[test]
    fn names_are_dns_labels_and_errors_name_the_flag() {
        let e = parse(&["--address", "127.0.0.1:1", "--version", "V2"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--version \"V2\": contains 'V'; only lowercase letters, digits and '-' are allowed"
        );
        let args = Args::try_parse_from([
            "usher-agent",
            "--directory",
            "d:1",
            "--ca",
            "ca",
            "--service",
            "Web",
            "--address",
            "127.0.0.1:1",
        ])
        .unwrap();
        let e = Config::from_args(args, "h").unwrap_err();
        assert!(e.to_string().starts_with("--service \"Web\""), "{e}");
    }

    #[test]
    fn a_bad_health_check_is_named() {
        let e = parse(&["--address", "127.0.0.1:1", "--health", "ping"]).unwrap_err();
        assert!(e.to_string().starts_with("--health \"ping\""), "{e}");
    }

    #[test]
    fn numeric_limits() {
        let base = ["--address", "127.0.0.1:1"];
        for (flag, value, name) in [
            ("--concurrency", "0", "--concurrency"),
            ("--rise", "0", "--rise"),
            ("--fall", "0", "--fall"),
            ("--drain-time", "100ms", "--drain-time"),
            ("--health-interval", "0s", "--health-interval"),
            ("--health-timeout", "0s", "--health-timeout"),
        ] {
            let mut argv = base.to_vec();
            argv.extend([flag, value]);
            let e = parse(&argv).unwrap_err();
            assert!(e.to_string().starts_with(name), "{e}");
        }
        let c = parse(&["--address", "127.0.0.1:1", "--drain-time", "250ms"]).unwrap();
        assert_eq!(c.drain_time, Duration::from_millis(250));
    }

    #[test]
    fn directory_needs_a_port() {
        for bad in ["directory", "directory:", "directory:0", ":7400", "d:99999"] {
            let argv = ["--address", "127.0.0.1:1"];
            let args = Args::try_parse_from(
                [
                    "usher-agent",
                    "--directory",
                    bad,
                    "--ca",
                    "c",
                    "--service",
                    "web",
                ]
                .into_iter()
                .chain(argv),
            )
            .unwrap();
            let e = Config::from_args(args, "h").unwrap_err();
            assert!(e.to_string().starts_with("--directory"), "{bad}: {e}");
        }
    }

    #[test]
    fn labels() {
        let c = parse(&[
            "--address",
            "127.0.0.1:1",
            "--label",
            "zone=eu-1",
            "--label",
            "team=",
        ])
        .unwrap();
        assert_eq!(c.labels.get("zone").map(String::as_str), Some("eu-1"));
        assert_eq!(c.labels.get("team").map(String::as_str), Some(""));
        for bad in ["zone", "=x", "a b=c", "k=1"] {
            let mut argv = vec!["--address", "127.0.0.1:1", "--label", bad];
            if bad == "k=1" {
                argv.extend(["--label", "k=2"]);
            }
            let e = parse(&argv).unwrap_err();
            assert!(e.to_string().starts_with("--label"), "{bad}: {e}");
        }
    }

    #[test]
    fn explicit_id_is_validated() {
        let c = parse(&["--address", "127.0.0.1:1", "--id", "web-1"]).unwrap();
        assert_eq!(c.id, "web-1");
        let e = parse(&["--address", "127.0.0.1:1", "--id", "web 1"]).unwrap_err();
        assert!(e.to_string().starts_with("--id"), "{e}");
    }

    #[test]
    fn default_ids_are_valid() {
        let id = default_instance_id("my host\n", "web", "v2", 0xab);
        assert_eq!(id, "my-host-web-v2-000000ab");
        let long = default_instance_id(&"h".repeat(300), &"s".repeat(63), &"v".repeat(63), 1);
        assert!(validate_instance_id(&long).is_ok(), "{long}");
        assert!(validate_instance_id(&default_instance_id("", "a", "b", 7)).is_ok());
    }
}
