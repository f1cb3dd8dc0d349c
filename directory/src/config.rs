//! The directory's command line (clap, every flag also read from `USHER_DIRECTORY_*`) over an
//! optional TOML file, and the typed, validated [`Config`] built from both by a pure function.
//!
//! ```text
//! usher-directory [--config FILE] [--listen ADDR] [--join-listen ADDR] [--admin ADDR]
//!                 [--admin-token-file FILE] [--state-dir DIR] [--node-cert-validity DURATION]
//!                 [--heartbeat-interval DURATION] [--grace-period DURATION]
//!                 [--self-preservation PERCENT] [--self-preservation-min-instances N]
//! usher-directory scale TARGET N|release
//! usher-directory token create --role agent|sidecar [--service NAME] [--ttl DURATION]
//! usher-directory token list
//! usher-directory token revoke ID
//! ```
//!
//! Precedence: flag (or its environment variable) over the TOML key over the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use thiserror::Error;

use crate::preservation::{PreservationSettings, DEFAULT_MIN_INSTANCES, DEFAULT_THRESHOLD_PERCENT};
use crate::services::{ServiceEntry, ServiceError, ServiceSpec};

/// Default QUIC address (DESIGN.md: udp 0.0.0.0:7400).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7400";
/// Default admin HTTP address (DESIGN.md: loopback only).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7401";
/// Default state directory (systemd `StateDirectory=usher/directory`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/usher/directory";
/// Default validity of the node certificates the directory issues.
pub const DEFAULT_NODE_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Node certificate validities outside this range are refused.
pub const MIN_NODE_CERT_VALIDITY: Duration = Duration::from_secs(10);
/// See [`MIN_NODE_CERT_VALIDITY`].
pub const MAX_NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default heartbeat interval dictated to agents (SwarmKit: the manager sets the period).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// An instance is withdrawn after this many heartbeat intervals of silence (DESIGN.md).
pub const TTL_INTERVALS: u32 = 3;
/// Heartbeat intervals outside this range are refused: faster floods the directory, slower
/// makes a dead host linger for minutes.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);
/// See [`MIN_HEARTBEAT_INTERVAL`].
pub const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);

/// The directory's flags as clap parses them; unset flags fall back to the TOML file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "usher-directory",
    version,
    about = "The usher directory: collects agent heartbeats, owns the route table and streams \
             it to sidecars over QUIC."
)]
pub struct Args {
    /// TOML file with the keys `listen`, `admin`, `state_dir`, `heartbeat_interval`,
    /// `grace_period`, `self_preservation`, `self_preservation_min_instances`, `threads`,
    /// `[[services]]`; flags and environment variables win over it.
    #[arg(long, env = "USHER_DIRECTORY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// QUIC (UDP) address agents and sidecars connect to [default: 0.0.0.0:7400].
    #[arg(long, env = "USHER_DIRECTORY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Join endpoint (UDP, QUIC ALPN `usher-join/1`): nodes enrol with a join token and renew
    /// their certificates there [default: the --listen address with its port + 1].
    #[arg(long, env = "USHER_DIRECTORY_JOIN_LISTEN", value_name = "ADDR")]
    pub join_listen: Option<SocketAddr>,

    /// File holding the admin bearer token, created (mode 0600) if missing; `scale` and
    /// `token` read it too [default: the state directory's `admin-token`].
    #[arg(
        long,
        env = "USHER_DIRECTORY_ADMIN_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub admin_token_file: Option<PathBuf>,

    /// Validity of the node certificates the directory issues; nodes renew after two thirds
    /// of it [default: 30 days].
    #[arg(long, env = "USHER_DIRECTORY_NODE_CERT_VALIDITY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub node_cert_validity: Option<Duration>,

    /// Admin HTTP address (`/healthz`, `/v1/routes`, `/v1/services`) [default: 127.0.0.1:7401].
    #[arg(
        long,
        env = "USHER_DIRECTORY_ADMIN",
        value_name = "ADDR",
        global = true
    )]
    pub admin: Option<SocketAddr>,

    /// Holds the cluster CA (`ca.pem`, `ca-key.pem`), `tokens.json` and `admin-token`
    /// [default: /var/lib/usher/directory].
    #[arg(
        long,
        env = "USHER_DIRECTORY_STATE_DIR",
        value_name = "DIR",
        global = true
    )]
    pub state_dir: Option<PathBuf>,

    /// Heartbeat interval dictated to agents (±10% jitter); TTL is 3 intervals [default: 1s].
    #[arg(long, env = "USHER_DIRECTORY_HEARTBEAT_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,

    /// After a start, sidecars holding a table get no update for this long, so agents can
    /// rejoin first [default: 2 × TTL].
    #[arg(long, env = "USHER_DIRECTORY_GRACE_PERIOD", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub grace_period: Option<Duration>,

    /// Hold withdrawals by TTL while more than PERCENT of the instances are silent at once
    /// (1.5 heartbeat intervals unheard): the directory or its network is then the likely
    /// fault. A hold ends when the share falls back (the instances still silent then get the
    /// grace period), or after 10 TTLs. 0 turns it off [default: 15].
    #[arg(long, env = "USHER_DIRECTORY_SELF_PRESERVATION", value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub self_preservation: Option<u8>,

    /// Fleets smaller than N instances are never held by --self-preservation [default: 50].
    #[arg(
        long,
        env = "USHER_DIRECTORY_SELF_PRESERVATION_MIN_INSTANCES",
        value_name = "N"
    )]
    pub self_preservation_min_instances: Option<usize>,

    /// Worker threads: 1 runs the directory on one thread, the cheapest per heartbeat (about
    /// half the CPU of two workers); raise it when a fleet needs more than one core
    /// [default: 1].
    #[arg(long, env = "USHER_DIRECTORY_THREADS", value_name = "N")]
    pub threads: Option<usize>,

    /// Without a command: run the directory.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Commands that talk to a running directory's admin port (`--admin`).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Pin a managed service version at N instances, or hand it back to the autoscaler with
    /// `release`.
    Scale {
        /// `SERVICE` or `SERVICE.VERSION`.
        target: String,
        /// A number of instances, or `release`.
        instances: String,
    },
    /// Join tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `usher-directory token ...`: talks to the running directory's admin port with the admin
/// token.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Prints a new join token (only its SHA-256 is kept by the directory).
    Create {
        /// `agent` or `sidecar`.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// The service an agent token is for (agents only).
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// How long the token can be used to join [default: 24h].
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Lists the tokens (id, role, service, expiry, revoked, uses).
    List,
    /// Revokes a token: no node can join with it any more.
    Revoke {
        /// The token id (second-to-last field of the token, or from `token list`).
        id: String,
    },
}

/// The TOML file: the same keys as the flags, all optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub join_listen: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub node_cert_validity: Option<Duration>,
    pub state_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub grace_period: Option<Duration>,
    pub self_preservation: Option<u8>,
    pub self_preservation_min_instances: Option<usize>,
    pub threads: Option<usize>,
    /// The `usher-agent` the `process` scheduler starts (default: beside this binary, else
    /// from `PATH`).
    pub agent_binary: Option<PathBuf>,
    /// Services the directory scales (see [`crate::services`]).
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
}

/// The directory's validated configuration. Tests build it directly.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// The join endpoint's address (enrolment and renewal).
    pub join_listen: SocketAddr,
    pub admin: SocketAddr,
    /// The admin bearer token's file.
    pub admin_token_file: PathBuf,
    pub state_dir: PathBuf,
    /// Validity of issued node certificates.
    pub node_cert_validity: Duration,
    /// The interval told to agents before jitter.
    pub heartbeat_interval: Duration,
    /// How long sidecars that hold another epoch's table wait for their first update.
    pub grace_period: Duration,
    /// Share of silent instances, in percent, above which withdrawals by TTL are held
    /// (0: never held; [`crate::preservation`]).
    pub self_preservation_percent: u8,
    /// Fleets smaller than this are never held.
    pub self_preservation_min_instances: usize,
    /// Runtime worker threads, 1..=[`usher_shared::runtime::MAX_THREADS`]; 1 means a
    /// current-thread runtime.
    pub threads: usize,
    /// The `usher-agent` binary the `process` scheduler starts; `None`: find it.
    pub agent_binary: Option<PathBuf>,
    /// Services the directory scales (none: it only routes what agents register).
    pub services: Vec<ServiceSpec>,
}

/// Why the configuration is refused; the message names the flag or TOML key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--config {path}: cannot read: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--config {path}: {source}")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("--config: {0}")]
    Service(#[from] ServiceError),
    #[error("--{flag} {value}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

impl Config {
    /// The time-to-live of a registration: [`TTL_INTERVALS`] heartbeat intervals.
    pub fn ttl(&self) -> Duration {
        self.heartbeat_interval * TTL_INTERVALS
    }

    /// How long a QUIC connection may stay silent before the directory drops it (sidecars
    /// ask for less and get it): [`usher_shared::quic::IDLE_TIMEOUT`], or the TTL plus one
    /// heartbeat interval if that is longer. Agents send no keep-alives and advertise no idle
    /// timeout, so this must outlast the longest gap between their heartbeats (an interval
    /// plus 10% jitter, or the 3 s an agent waits for the reply to a registration, in which it
    /// sends nothing); the TTL withdraws a silent agent's instance before its connection
    /// times out.
    pub fn connection_idle_timeout(&self) -> Duration {
        usher_shared::quic::IDLE_TIMEOUT.max(self.ttl() + self.heartbeat_interval)
    }

    /// How long a registered agent's stream may stay silent before the directory drops it,
    /// though its connection is open: two TTLs, and no less than
    /// [`Config::connection_idle_timeout`]. Its instance was withdrawn after one TTL; this
    /// frees the stream of an agent that keeps its connection alive but stopped
    /// heartbeating. Never sooner than the connection's timeout, so a directory that was
    /// paused or starved for less than that (its timers run before it reads the heartbeats
    /// waiting in its socket) does not end every agent's conversation at a short heartbeat
    /// interval (200 ms: two TTLs are 1.2 s).
    pub fn silent_stream_timeout(&self) -> Duration {
        (self.ttl() * 2).max(self.connection_idle_timeout())
    }

    /// When withdrawals by TTL are held ([`crate::preservation`]).
    pub fn preservation(&self) -> PreservationSettings {
        PreservationSettings::new(
            self.self_preservation_percent,
            self.self_preservation_min_instances,
            self.heartbeat_interval,
            self.ttl(),
        )
    }

    /// A configuration for tests: loopback port 0 everywhere, state in `state_dir`, a fast
    /// heartbeat.
    pub fn for_tests(state_dir: &Path, heartbeat_interval: Duration) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid literal"),
            join_listen: "127.0.0.1:0".parse().expect("valid literal"),
            admin: "127.0.0.1:0".parse().expect("valid literal"),
            admin_token_file: state_dir.join(crate::admin_token::ADMIN_TOKEN_FILE),
            state_dir: state_dir.to_path_buf(),
            node_cert_validity: DEFAULT_NODE_CERT_VALIDITY,
            heartbeat_interval,
            grace_period: heartbeat_interval * TTL_INTERVALS * 2,
            self_preservation_percent: DEFAULT_THRESHOLD_PERCENT,
            self_preservation_min_instances: DEFAULT_MIN_INSTANCES,
            threads: 1,
            agent_binary: None,
            services: Vec::new(),
        }
    }

    /// Reads the `--config` file, if any, and builds the configuration.
    pub fn load(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
            None => FileConfig::default(),
        };
        Self::resolve(args, file)
    }

    /// Merges flags over the file over defaults and validates the result. Pure.
    ///
    /// Errors: a heartbeat interval outside 50ms..=60s, a grace period shorter than one
    /// TTL (a restart would then withdraw instances whose agents had no time to rejoin), or a
    /// self-preservation share over 100%.
    pub fn resolve(args: Args, file: FileConfig) -> Result<Self, ConfigError> {
        let heartbeat_interval = args
            .heartbeat_interval
            .or(file.heartbeat_interval)
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        if !(MIN_HEARTBEAT_INTERVAL..=MAX_HEARTBEAT_INTERVAL).contains(&heartbeat_interval) {
            return Err(ConfigError::Invalid {
                flag: "heartbeat-interval",
                value: humantime::format_duration(heartbeat_interval).to_string(),
                reason: "must be between 50ms and 60s".into(),
            });
        }
        let ttl = heartbeat_interval * TTL_INTERVALS;
        let grace_period = args.grace_period.or(file.grace_period).unwrap_or(ttl * 2);
        if grace_period < ttl {
            return Err(ConfigError::Invalid {
                flag: "grace-period",
                value: humantime::format_duration(grace_period).to_string(),
                reason: format!(
                    "must be at least one TTL ({})",
                    humantime::format_duration(ttl)
                ),
            });
        }
        let self_preservation_percent = args
            .self_preservation
            .or(file.self_preservation)
            .unwrap_or(DEFAULT_THRESHOLD_PERCENT);
        if self_preservation_percent > 100 {
            return Err(ConfigError::Invalid {
                flag: "self-preservation",
                value: self_preservation_percent.to_string(),
                reason: "must be a percentage, 0 to 100".into(),
            });
        }
        let node_cert_validity = args
            .node_cert_validity
            .or(file.node_cert_validity)
            .unwrap_or(DEFAULT_NODE_CERT_VALIDITY);
        if !(MIN_NODE_CERT_VALIDITY..=MAX_NODE_CERT_VALIDITY).contains(&node_cert_validity) {
            return Err(ConfigError::Invalid {
                flag: "node-cert-validity",
                value: humantime::format_duration(node_cert_validity).to_string(),
                reason: "must be between 10s and 365 days".into(),
            });
        }
        let listen: SocketAddr = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid literal"));
        let join_listen = match args.join_listen.or(file.join_listen) {
            Some(addr) => addr,
            None => {
                let mut addr = listen;
                addr.set_port(listen.port().checked_add(1).ok_or_else(|| {
                    ConfigError::Invalid {
                        flag: "join-listen",
                        value: "(default)".into(),
                        reason: format!(
                            "--listen port {} has no next port; set --join-listen",
                            listen.port()
                        ),
                    }
                })?);
                if listen.port() == 0 {
                    addr.set_port(0);
                }
                addr
            }
        };
        let state_dir: PathBuf = args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let admin_token_file = args
            .admin_token_file
            .or(file.admin_token_file)
            .unwrap_or_else(|| state_dir.join(crate::admin_token::ADMIN_TOKEN_FILE));
        let threads = args.threads.or(file.threads).unwrap_or(1);
        let threads = usher_shared::runtime::check_threads(threads).map_err(|reason| {
            ConfigError::Invalid {
                flag: "threads",
                value: threads.to_string(),
                reason,
            }
        })?;
        Ok(Self {
            listen,
            join_listen,
            admin: args
                .admin
                .or(file.admin)
                .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid literal")),
            admin_token_file,
            state_dir,
            node_cert_validity,
            heartbeat_interval,
            grace_period,
            self_preservation_percent,
            self_preservation_min_instances: args
                .self_preservation_min_instances
                .or(file.self_preservation_min_instances)
                .unwrap_or(DEFAULT_MIN_INSTANCES),
            threads,
            agent_binary: file.agent_binary,
            services: crate::services::validate(&file.services)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("usher-directory").chain(flags.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::resolve(Args::default(), FileConfig::default()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
        assert_eq!(c.join_listen, "0.0.0.0:7401".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:7401".parse().unwrap());
        assert_eq!(
            c.admin_token_file,
            PathBuf::from("/var/lib/usher/directory/admin-token")
        );
        assert_eq!(c.node_cert_validity, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/usher/directory"));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.ttl(), Duration::from_secs(3));
        assert_eq!(c.grace_period, Duration::from_secs(6));
        assert_eq!(c.threads, 1);
        let p = c.preservation();
        assert_eq!((p.threshold, p.min_instances), (0.15, 50));
        assert_eq!(p.silent_after, Duration::from_millis(1500));
        assert_eq!(p.max_hold, Duration::from_secs(30));
    }

    #[test]
    fn an_agent_is_given_up_on_no_sooner_than_its_connection() {
        let dir = Path::new("/nonexistent");
        let at = |ms| Config::for_tests(dir, Duration::from_millis(ms));
        // 1 s: TTL 3 s, connection 5 s (the floor), a silent stream two TTLs.
        assert_eq!(at(1_000).connection_idle_timeout(), Duration::from_secs(5));
        assert_eq!(at(1_000).silent_stream_timeout(), Duration::from_secs(6));
        // 200 ms: two TTLs (1.2 s) would cut every conversation after a 1.2 s stall.
        assert_eq!(at(200).silent_stream_timeout(), Duration::from_secs(5));
        // 10 s: TTL 30 s, connection 40 s, stream 60 s.
        assert_eq!(
            at(10_000).connection_idle_timeout(),
            Duration::from_secs(40)
        );
        assert_eq!(at(10_000).silent_stream_timeout(), Duration::from_secs(60));
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nadmin = \"127.0.0.1:9001\"\nheartbeat_interval = \"2s\"\nthreads = 2\nself_preservation = 40\nself_preservation_min_instances = 7\n",
        )
        .unwrap();
        let args = parse(&[
            "--listen",
            "127.0.0.1:8000",
            "--grace-period",
            "10s",
            "--self-preservation",
            "0",
        ])
        .unwrap();
        let c = Config::resolve(args, file).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(c.admin, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.grace_period, Duration::from_secs(10));
        assert_eq!(c.threads, 2);
        assert_eq!(
            (
                c.self_preservation_percent,
                c.self_preservation_min_instances
            ),
            (0, 7)
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = Config::resolve(
            parse(&["--heartbeat-interval", "10ms"]).unwrap(),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--heartbeat-interval"), "{e}");
        let e = Config::resolve(
            parse(&["--heartbeat-interval", "1s", "--grace-period", "1s"]).unwrap(),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--grace-period"), "{e}");
        let e = Config::resolve(
            parse(&["--node-cert-validity", "1s"]).unwrap(),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--node-cert-validity"), "{e}");
        let e = Config::resolve(
            parse(&["--listen", "127.0.0.1:65535"]).unwrap(),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--join-listen"), "{e}");
        for threads in ["0", "100000"] {
            let e = Config::resolve(
                parse(&["--threads", threads]).unwrap(),
                FileConfig::default(),
            )
            .unwrap_err();
            assert!(e.to_string().contains("--threads"), "{e}");
        }
        let e = parse(&["--self-preservation", "101"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--self-preservation"), "{e}");
        let file: FileConfig = toml::from_str("self_preservation = 150").unwrap();
        let e = Config::resolve(Args::default(), file).unwrap_err();
        assert!(e.to_string().contains("--self-preservation 150"), "{e}");
        let e = parse(&["--listen", "nowhere"]).unwrap_err().to_string();
        assert!(e.contains("--listen"), "{e}");
        let e = parse(&["--heartbeat-interval", "soon"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--heartbeat-interval"), "{e}");
    }

    #[test]
    fn unknown_or_malformed_file_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("listn = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<FileConfig>("heartbeat_interval = \"often\"").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("directory.toml");
        std::fs::write(&path, "listen = 5\n").unwrap();
        let args = Args {
            config: Some(path),
            ..Args::default()
        };
        let e = Config::load(args).unwrap_err().to_string();
        assert!(
            e.contains("--config") && e.contains("directory.toml"),
            "{e}"
        );
    }
}
