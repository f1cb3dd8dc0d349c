//! The `process` backend: starts each instance on this host as
//! `usher-agent --service S --version V ... -- COMMAND`, replaces crashed ones while they are
//! wanted, and stops chosen instances (idlest first) with SIGTERM, so their agent drains them
//! first (marks them `draining`, waits `drain_time`, stops the child, deregisters). Children
//! never outlive a directory that exits cleanly.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{AgentContext, Observed, Scheduler, SchedulerError, SHUTDOWN_GRACE};
use crate::pki::CertAuthority;
use crate::services::ServiceSpec;

/// How the directory certifies the agents it starts: before each start it issues a
/// certificate for an agent of the service and writes `node.pem`, `node-key.pem` (0600) and
/// `ca.pem` into the instance's state folder; the agent uses them (no join token) and renews
/// them at the join endpoint like any node.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub authority: Arc<CertAuthority>,
    /// Validity of the certificates issued.
    pub validity: Duration,
    /// The join endpoint the agents renew at.
    pub join: SocketAddr,
}

impl AgentIdentity {
    /// Writes a fresh certificate for an agent of `service` into `dir` (created if missing).
    /// Errors: the certificate cannot be made or the files cannot be written.
    fn provision(&self, service: &str, dir: &Path) -> Result<(), String> {
        let identity = usher_shared::identity::NodeIdentity::Agent {
            service: service.to_string(),
        };
        let (cert, key) = self
            .authority
            .issue_node(&identity, self.validity)
            .map_err(|e| e.to_string())?;
        // Not fsynced: three durable writes (six fsyncs) cost ~2.5 ms of a cold start on a
        // virtual disk, on the directory's thread, for files the agent reads at once and a
        // crash makes moot.
        let transient = usher_shared::files::Durability::Transient;
        usher_shared::enrolment::store(dir, &cert, &key, &self.authority.ca_pem, transient)
            .map_err(|e| e.to_string())
    }
}

#[derive(Debug)]
pub(super) struct Agent {
    pub(super) id: String,
    pub(super) child: Child,
    started: Instant,
}

impl Agent {
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
    pub(super) running: Vec<Agent>,
    pub(super) stopping: Vec<Agent>,
    next: u64,
}

impl ProcessScheduler {
    pub fn new(spec: &ServiceSpec, command: &[String], agents: &AgentContext) -> Self {
        ProcessScheduler {
            spec: spec.clone(),
            command: command.to_vec(),
            agents: agents.clone(),
            running: Vec::new(),
            stopping: Vec::new(),
            next: 0,
        }
    }
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
        self.running.push(Agent {
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

    async fn scale(&mut self, desired: u32, observed: &Observed) -> Result<(), SchedulerError> {
        self.reap();
        while self.started() < desired {
            self.spawn()?;
        }
        if self.started() > desired {
            // Idlest first; among equally idle ones the newest, as the oldest have warm caches
            // and connections.
            self.running
                .sort_by_key(|m| (observed.in_flight(&m.id), std::cmp::Reverse(m.started)));
            let excess = self.running.len() - desired as usize;
            for victim in self.running.drain(..excess) {
                info!(service = %self.spec.name, version = %self.spec.version, id = %victim.id,
                      in_flight = observed.in_flight(&victim.id),
                      "stopping an instance (its agent drains it first)");
                victim.terminate();
                self.stopping.push(victim);
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        let mut all: Vec<Agent> = self
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
