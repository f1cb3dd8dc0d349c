//! Scheduler backends: how the autoscaler's target becomes running instances. One trait,
//! [`Scheduler`] (observe what runs, move toward a desired count, stop chosen instances, idlest
//! first), three backends chosen per service version by its `scheduler` key:
//!
//! - [`process::ProcessScheduler`] (the default): `usher-agent` processes on this host;
//! - [`command::CommandScheduler`]: the operator's `scale_command` hook;
//! - [`kubernetes::KubernetesScheduler`]: a Deployment's scale subresource, through kube-rs.

pub mod command;
pub mod kubernetes;
pub mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;
use usher_shared::backoff::Backoff;

use crate::services::{SchedulerSpec, ServiceSpec};
use command::CommandScheduler;
use kubernetes::KubernetesScheduler;
pub use process::AgentIdentity;
use process::ProcessScheduler;

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
    #[error("kubernetes: {0}")]
    Kubernetes(String),
}

/// What the directory sees of one version's instances when it scales.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Ids of the version's instances in the route table.
    pub registered: Vec<String>,
    /// In-flight requests per instance id, summed over the sidecars' load reports; an instance
    /// left out is idle.
    pub busy: BTreeMap<String, u64>,
}

impl Observed {
    /// In-flight requests on instance `id`.
    pub fn in_flight(&self, id: &str) -> u64 {
        self.busy.get(id).copied().unwrap_or(0)
    }

    /// The `count` registered instances to stop first: the idlest (Waiter: scale down kills
    /// idle instances), ties broken by id so the choice is stable from cycle to cycle.
    pub fn idlest(&self, count: usize) -> Vec<String> {
        let mut ids: Vec<&String> = self.registered.iter().collect();
        ids.sort_by_key(|id| (self.in_flight(id), *id));
        ids.into_iter().take(count).cloned().collect()
    }
}

/// What every backend does: start or stop instances toward a desired count.
pub trait Scheduler {
    /// Instances started (or asked of the cluster) and not being stopped.
    fn started(&self) -> u32;
    /// Moves toward `desired` instances; when there are too many, stops the idlest in
    /// `observed` first, after draining them.
    fn scale(
        &mut self,
        desired: u32,
        observed: &Observed,
    ) -> impl std::future::Future<Output = Result<(), SchedulerError>> + Send;
    /// Stops everything it started (directory shutdown), bounded by the drain time plus
    /// [`SHUTDOWN_GRACE`].
    fn shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

/// Applies a desired count to an external system (a hook, a cluster) once per change, and
/// after a failure not again before a backoff (1 s doubling to 60 s) has passed.
#[derive(Debug)]
pub struct Applier {
    applied: Option<u32>,
    backoff: Backoff,
    retry_at: Option<Instant>,
}

impl Default for Applier {
    fn default() -> Self {
        Applier {
            applied: None,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            retry_at: None,
        }
    }
}

impl Applier {
    /// The count last applied successfully.
    pub fn applied(&self) -> Option<u32> {
        self.applied
    }

    /// Whether `desired` should be applied at `now`.
    pub fn due(&self, desired: u32, now: Instant) -> bool {
        self.applied != Some(desired) && self.retry_at.is_none_or(|at| now >= at)
    }

    /// Records the outcome of applying `desired`.
    pub fn record<E>(&mut self, desired: u32, result: &Result<(), E>, now: Instant) {
        match result {
            Ok(()) => {
                self.applied = Some(desired);
                self.backoff.reset();
                self.retry_at = None;
            }
            Err(_) => self.retry_at = Some(now + self.backoff.next_delay()),
        }
    }

    /// Forgets what was applied, so the next call applies again (the cluster drifted).
    pub fn forget(&mut self) {
        self.applied = None;
    }
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

/// One of the backends, chosen per service version by its `scheduler` key.
#[derive(Debug)]
pub enum Backend {
    Process(ProcessScheduler),
    Command(CommandScheduler),
    Kubernetes(Box<KubernetesScheduler>),
}

impl Backend {
    pub fn new(spec: &ServiceSpec, agents: &AgentContext) -> Self {
        match &spec.scheduler {
            SchedulerSpec::Process { command } => {
                Backend::Process(ProcessScheduler::new(spec, command, agents))
            }
            SchedulerSpec::Command { scale_command } => {
                Backend::Command(CommandScheduler::new(spec, scale_command))
            }
            SchedulerSpec::Kubernetes {
                namespace,
                deployment,
            } => Backend::Kubernetes(Box::new(KubernetesScheduler::new(
                spec, namespace, deployment,
            ))),
        }
    }

    /// The backend's `scheduler` key.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Process(_) => "process",
            Backend::Command(_) => "command",
            Backend::Kubernetes(_) => "kubernetes",
        }
    }
}

impl Scheduler for Backend {
    fn started(&self) -> u32 {
        match self {
            Backend::Process(p) => p.started(),
            Backend::Command(c) => c.started(),
            Backend::Kubernetes(k) => k.started(),
        }
    }

    async fn scale(&mut self, desired: u32, observed: &Observed) -> Result<(), SchedulerError> {
        match self {
            Backend::Process(p) => p.scale(desired, observed).await,
            Backend::Command(c) => c.scale(desired, observed).await,
            Backend::Kubernetes(k) => k.scale(desired, observed).await,
        }
    }

    async fn shutdown(&mut self) {
        match self {
            Backend::Process(p) => p.shutdown().await,
            Backend::Command(c) => c.shutdown().await,
            Backend::Kubernetes(k) => k.shutdown().await,
        }
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
        let none = Observed::default();
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
        s.scale(3, &none).await.unwrap();
        s.scale(3, &none).await.unwrap();
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
        let e = failing.scale(2, &none).await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("3"), "{e}");
        // Within the backoff the hook is not run again.
        failing.scale(2, &none).await.unwrap();
        assert_eq!(failing.started(), 0);
    }

    #[tokio::test]
    async fn the_process_backend_starts_replaces_and_stops_agents() {
        let none = Observed::default();
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
            match s.scale(3, &none).await {
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
        // Scale down stops the idlest first: the busiest instance is the one kept.
        let Backend::Process(p) = &s else {
            unreachable!()
        };
        let ids: Vec<String> = p.running.iter().map(|a| a.id.clone()).collect();
        let observed = Observed {
            registered: ids.clone(),
            busy: [(ids[0].clone(), 1), (ids[1].clone(), 5)].into(),
        };
        s.scale(1, &observed).await.unwrap();
        assert_eq!(s.started(), 1);
        if let Backend::Process(p) = &s {
            assert_eq!(p.running[0].id, ids[1]);
        }
        // A crashed instance is replaced at the next cycle.
        if let Backend::Process(p) = &mut s {
            p.running[0].child.start_kill().unwrap();
            p.running[0].child.wait().await.unwrap();
        }
        s.scale(1, &none).await.unwrap();
        assert_eq!(s.started(), 1);
        let started = std::time::Instant::now();
        s.shutdown().await;
        assert!(started.elapsed() < Duration::from_secs(10));
        if let Backend::Process(p) = &s {
            assert!(p.running.is_empty() && p.stopping.is_empty());
        }
    }
}
