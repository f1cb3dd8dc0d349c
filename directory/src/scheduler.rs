//! Scheduler backends: how the autoscaler's target becomes running instances. One trait,
//! [`Scheduler`]; two backends so far:
//!
//! - [`ProcessScheduler`] (the default): starts each instance on this host as
//!   `usher-agent --service S --version V ... -- COMMAND`, replaces crashed ones while they are
//!   wanted, and stops chosen instances with SIGTERM, so their agent drains them first (marks
//!   them `draining`, waits, stops the child, deregisters). Children never outlive a directory
//!   that exits cleanly.
//! - [`CommandScheduler`]: runs the operator's `scale_command` with the desired count
//!   (`{service}`, `{version}`, `{instances}`), for systemd template units, Nomad, anything; a
//!   failing hook is logged with its output and retried with backoff.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};
use usher_shared::backoff::Backoff;

use crate::services::{SchedulerSpec, ServiceSpec};

/// How long a stopping instance gets beyond its drain time before it is killed at directory
/// shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// How long a `scale_command` may run.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a backend could not act.
#[derive(Debug, Error)]
pub enum SchedulerError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scale command {program} failed ({status}): {output}")]
    Hook {
        program: String,
        status: String,
        output: String,
    },
}

/// What every backend does: start or stop instances toward a desired count.
pub trait Scheduler {
    /// Instances started and not being stopped.
    fn started(&self) -> u32;
    /// Moves toward `desired` instances.
    fn scale(
        &mut self,
        desired: u32,
    ) -> impl std::future::Future<Output = Result<(), SchedulerError>> + Send;
    /// Stops everything it started (directory shutdown), bounded by the drain time plus
    /// [`SHUTDOWN_GRACE`].
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// Where the `process` backend's agents find the directory.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// The `usher-agent` binary.
    pub agent: PathBuf,
    /// The directory's QUIC address as agents on this host dial it.
    pub directory: SocketAddr,
    /// The cluster CA (`ca.pem`).
    pub ca: PathBuf,
    /// Under which each instance gets a state folder.
    pub state_dir: PathBuf,
    /// Issues each started agent its certificate; `None`: the agents bring their own.
    pub identity: Option<AgentIdentity>,
}

/// How the directory certifies the agents it starts: it writes `node.pem`, `node-key.pem` and
/// `ca.pem` into the instance's state folder, which the agent then uses (no join token).
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub authority: std::sync::Arc<crate::pki::CertAuthority>,
    pub validity: Duration,
    /// The join endpoint the agent renews at.
    pub join: SocketAddr,
}

impl AgentIdentity {
    /// Writes a certificate for an agent of `service` into `dir`.
    fn provision(&self, service: &str, dir: &Path) -> Result<(), String> {
        use usher_shared::enrolment::{CA_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
        use usher_shared::files::write_atomic;
        let identity = usher_shared::identity::NodeIdentity::Agent {
            service: service.to_string(),
        };
        let (cert, key) = self
            .authority
            .issue_node(&identity, self.validity)
            .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        write_atomic(&dir.join(CA_FILE), self.authority.ca_pem.as_bytes(), 0o644)
            .and_then(|()| write_atomic(&dir.join(NODE_KEY_FILE), key.as_bytes(), 0o600))
            .and_then(|()| write_atomic(&dir.join(NODE_CERT_FILE), cert.as_bytes(), 0o644))
            .map_err(|e| e.to_string())
    }
}

impl AgentContext {
    /// `usher-agent` beside the running binary if present, else from `PATH`.
    pub fn find_agent(configured: Option<&Path>) -> PathBuf {
        if let Some(path) = configured {
            return path.to_path_buf();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("usher-agent")))
            .filter(|path| path.exists())
            .unwrap_or_else(|| PathBuf::from("usher-agent"))
    }
}

/// One of the two backends, chosen per service version by its `scheduler` key.
#[derive(Debug)]
pub enum Backend {
    Process(ProcessScheduler),
    Command(CommandScheduler),
}

impl Backend {
    pub fn new(spec: &ServiceSpec, agents: &AgentContext) -> Self {
        match &spec.scheduler {
            SchedulerSpec::Process { command } => Backend::Process(ProcessScheduler {
                spec: spec.clone(),
                command: command.clone(),
                agents: agents.clone(),
                running: Vec::new(),
                stopping: Vec::new(),
                next: 0,
            }),
            SchedulerSpec::Command { scale_command } => Backend::Command(CommandScheduler {
                spec: spec.clone(),
                scale_command: scale_command.clone(),
                applied: None,
                backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
                retry_at: None,
            }),
        }
    }
}

impl Scheduler for Backend {
    fn started(&self) -> u32 {
        match self {
            Backend::Process(p) => p.started(),
            Backend::Command(c) => c.started(),
        }
    }

    async fn scale(&mut self, desired: u32) -> Result<(), SchedulerError> {
        match self {
            Backend::Process(p) => p.scale(desired).await,
            Backend::Command(c) => c.scale(desired).await,
        }
    }

    async fn shutdown(&mut self) {
        match self {
            Backend::Process(p) => p.shutdown().await,
            Backend::Command(c) => c.shutdown().await,
        }
    }
}

#[derive(Debug)]
struct Managed {
    id: String,
    child: Child,
    started: Instant,
}

impl Managed {
    /// SIGTERM: the agent drains its instance, then exits.
    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
}

/// Starts instances as `usher-agent` processes on this host.
#[derive(Debug)]
pub struct ProcessScheduler {
    spec: ServiceSpec,
    command: Vec<String>,
    agents: AgentContext,
    running: Vec<Managed>,
    stopping: Vec<Managed>,
    next: u64,
}

impl ProcessScheduler {
    /// Forgets agents that exited; a running one that exited on its own is reported (it is
    /// replaced by the next `scale` while wanted).
    fn reap(&mut self) {
        let spec = &self.spec;
        self.running.retain_mut(|m| match m.child.try_wait() {
            Ok(Some(status)) => {
                warn!(service = %spec.name, version = %spec.version, id = %m.id, %status,
                      "instance exited; it is replaced while wanted");
                false
            }
            _ => true,
        });
        self.stopping
            .retain_mut(|m| !matches!(m.child.try_wait(), Ok(Some(_))));
    }

    fn spawn(&mut self) -> Result<(), SchedulerError> {
        self.next += 1;
        let id = format!(
            "{}-{}-{}-{:08x}",
            self.spec.name,
            self.spec.version,
            self.next,
            rand::random::<u32>()
        );
        let a = &self.agents;
        let mut command = Command::new(&a.agent);
        if let Some(identity) = &a.identity {
            identity
                .provision(&self.spec.name, &a.state_dir.join(&id))
                .map_err(|reason| SchedulerError::Spawn {
                    program: a.agent.clone(),
                    source: std::io::Error::other(format!("cannot certify the agent: {reason}")),
                })?;
            command.arg("--join-address").arg(identity.join.to_string());
        }
        command
            .arg("--directory")
            .arg(a.directory.to_string())
            .arg("--ca")
            .arg(&a.ca)
            .args([
                "--service",
                &self.spec.name,
                "--version",
                &self.spec.version,
            ])
            .args(["--id", &id, "--health", &self.spec.health])
            .args(["--concurrency", &self.spec.scale.concurrency.to_string()])
            .arg("--drain-time")
            .arg(humantime::format_duration(self.spec.drain_time).to_string())
            .args(["--admin", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(a.state_dir.join(&id))
            .arg("--")
            .args(&self.command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| SchedulerError::Spawn {
            program: a.agent.clone(),
            source,
        })?;
        info!(service = %self.spec.name, version = %self.spec.version, %id, pid = child.id(),
              "started an instance");
        self.running.push(Managed {
            id,
            child,
            started: Instant::now(),
        });
        Ok(())
    }
}

impl Scheduler for ProcessScheduler {
    fn started(&self) -> u32 {
        self.running.len() as u32
    }

    async fn scale(&mut self, desired: u32) -> Result<(), SchedulerError> {
        self.reap();
        while self.started() < desired {
            self.spawn()?;
        }
        if self.started() > desired {
            // The newest instances go first: the oldest have warm caches and connections.
            self.running.sort_by_key(|m| m.started);
            while self.started() > desired {
                let Some(victim) = self.running.pop() else {
                    break;
                };
                info!(service = %self.spec.name, version = %self.spec.version, id = %victim.id,
                      "stopping an instance (its agent drains it first)");
                victim.terminate();
                self.stopping.push(victim);
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        let mut all: Vec<Managed> = self
            .running
            .drain(..)
            .chain(self.stopping.drain(..))
            .collect();
        for m in &all {
            m.terminate();
        }
        let deadline = Instant::now() + self.spec.drain_time + SHUTDOWN_GRACE;
        for m in &mut all {
            if tokio::time::timeout_at(deadline, m.child.wait())
                .await
                .is_err()
            {
                warn!(id = %m.id, "instance did not stop in time; killing it");
                let _ = m.child.kill().await;
            }
        }
    }
}

/// Runs the operator's hook with the desired count.
#[derive(Debug)]
pub struct CommandScheduler {
    spec: ServiceSpec,
    scale_command: Vec<String>,
    /// The count the hook last accepted.
    applied: Option<u32>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl CommandScheduler {
    fn args(&self, desired: u32) -> Vec<String> {
        self.scale_command
            .iter()
            .map(|a| {
                a.replace("{service}", &self.spec.name)
                    .replace("{version}", &self.spec.version)
                    .replace("{instances}", &desired.to_string())
            })
            .collect()
    }

    async fn run_hook(&self, desired: u32) -> Result<(), SchedulerError> {
        let args = self.args(desired);
        let (program, rest) = args.split_first().expect("validated non-empty");
        let output = Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(HOOK_TIMEOUT, output).await {
            Err(_) => {
                return Err(SchedulerError::Hook {
                    program: program.clone(),
                    status: format!("no exit within {HOOK_TIMEOUT:?}"),
                    output: String::new(),
                })
            }
            Ok(Err(source)) => {
                return Err(SchedulerError::Spawn {
                    program: program.into(),
                    source,
                })
            }
            Ok(Ok(output)) => output,
        };
        if output.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(SchedulerError::Hook {
            program: program.clone(),
            status: output.status.to_string(),
            output: text.trim().chars().take(2000).collect(),
        })
    }
}

impl Scheduler for CommandScheduler {
    fn started(&self) -> u32 {
        self.applied.unwrap_or(0)
    }

    async fn scale(&mut self, desired: u32) -> Result<(), SchedulerError> {
        if self.applied == Some(desired) {
            return Ok(());
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        match self.run_hook(desired).await {
            Ok(()) => {
                info!(service = %self.spec.name, version = %self.spec.version, instances = desired,
                      "scale command applied");
                self.applied = Some(desired);
                self.backoff.reset();
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                Err(e)
            }
        }
    }

    async fn shutdown(&mut self) {
        // The operator's instances are theirs: a directory shutdown leaves them running.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::ScaleSettings;

    fn spec(scheduler: SchedulerSpec) -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            version: "v1".into(),
            scheduler,
            health: "tcp".into(),
            drain_time: crate::services::DEFAULT_DRAIN_TIME,
            scale: ScaleSettings::default(),
        }
    }

    fn agents(dir: &Path) -> AgentContext {
        AgentContext {
            agent: PathBuf::from("/bin/sleep"),
            directory: "127.0.0.1:7400".parse().unwrap(),
            ca: dir.join("ca.pem"),
            state_dir: dir.to_path_buf(),
            identity: None,
        }
    }

    #[tokio::test]
    async fn the_command_hook_gets_the_count_and_failures_are_retried_later() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("calls");
        let script = format!("echo \"$1 $2 $3\" >> {}", out.display());
        let mut s = Backend::new(
            &spec(SchedulerSpec::Command {
                scale_command: vec![
                    "sh".into(),
                    "-c".into(),
                    script,
                    "hook".into(),
                    "{service}".into(),
                    "{version}".into(),
                    "{instances}".into(),
                ],
            }),
            &agents(dir.path()),
        );
        s.scale(3).await.unwrap();
        s.scale(3).await.unwrap();
        assert_eq!(s.started(), 3);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "web v1 3\n",
            "called once per change"
        );

        let mut failing = Backend::new(
            &spec(SchedulerSpec::Command {
                scale_command: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
            }),
            &agents(dir.path()),
        );
        let e = failing.scale(2).await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("3"), "{e}");
        // Within the backoff the hook is not run again.
        failing.scale(2).await.unwrap();
        assert_eq!(failing.started(), 0);
    }

    #[tokio::test]
    async fn the_process_backend_starts_replaces_and_stops_agents() {
        // A shell script stands in for usher-agent: it ignores the flags, runs until SIGTERM.
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("agent.sh");
        std::fs::write(&script, "#!/bin/sh\ntrap 'exit 0' TERM\nsleep 30 & wait\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut ctx = agents(dir.path());
        ctx.agent = script;
        let mut s = Backend::new(
            &spec(SchedulerSpec::Process {
                command: vec!["x".into()],
            }),
            &ctx,
        );
        // A test running in parallel may fork while the script's write handle is open
        // (ETXTBSY, "text file busy"): retry until the file is free.
        for _ in 0..100 {
            match s.scale(3).await {
                Err(SchedulerError::Spawn { source, .. })
                    if source.kind() == std::io::ErrorKind::ExecutableFileBusy =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => {
                    other.unwrap();
                    break;
                }
            }
        }
        assert_eq!(s.started(), 3);
        s.scale(1).await.unwrap();
        assert_eq!(s.started(), 1);
        // A crashed instance is replaced at the next cycle.
        if let Backend::Process(p) = &mut s {
            p.running[0].child.start_kill().unwrap();
            p.running[0].child.wait().await.unwrap();
        }
        s.scale(1).await.unwrap();
        assert_eq!(s.started(), 1);
        let started = std::time::Instant::now();
        s.shutdown().await;
        assert!(started.elapsed() < Duration::from_secs(10));
        if let Backend::Process(p) = &s {
            assert!(p.running.is_empty() && p.stopping.is_empty());
        }
    }
}
