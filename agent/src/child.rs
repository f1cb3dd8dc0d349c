//! Supervision of the instance process the agent starts itself (`-- COMMAND ARGS...`).
//!
//! The child runs in its own process group with stdin closed and stdout/stderr inherited.
//! `{port}` in its arguments and the `PORT` environment variable carry the instance's port.
//! It never outlives the agent: [`Supervised::stop`] sends SIGTERM to its process group, then
//! SIGKILL after a timeout, and the handle kills it on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use crate::config::ChildCommand;

/// The placeholder replaced by the instance's port in the child's arguments.
pub const PORT_PLACEHOLDER: &str = "{port}";

/// Why the child could not be started or watched.
#[derive(Debug, Error)]
pub enum ChildError {
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for the instance process: {0}")]
    Wait(#[source] std::io::Error),
    #[error("cannot pick a free loopback port: {0}")]
    PickPort(#[source] std::io::Error),
}

/// Picks a free TCP port on 127.0.0.1 by binding port 0, reading the port and closing the
/// socket; the child binds it right after (a small race with other processes is accepted).
pub fn pick_loopback_port() -> Result<SocketAddr, ChildError> {
    let listener =
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ChildError::PickPort)?;
    listener.local_addr().map_err(ChildError::PickPort)
}

/// `args` with every `{port}` replaced by `port`.
pub fn substitute_port(args: &[String], port: u16) -> Vec<String> {
    let port = port.to_string();
    args.iter()
        .map(|a| a.replace(PORT_PLACEHOLDER, &port))
        .collect()
}

/// The process exit code the agent should use for a child's exit status: its exit code, or
/// 128 + the signal number if a signal ended it (as shells do).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(signal)) => (128 + (signal & 0x7f)) as u8,
        (None, None) => 1,
    }
}

/// A running child process.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    pid: Option<u32>,
    program: String,
}

impl Supervised {
    /// Starts `command` with `{port}` replaced by `port` and `PORT=<port>` in its environment,
    /// in a new process group, stdin from `/dev/null`, stdout/stderr inherited.
    pub fn spawn(command: &ChildCommand, port: u16) -> Result<Self, ChildError> {
        let args = substitute_port(&command.args, port);
        let child = Command::new(&command.program)
            .args(&args)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ChildError::Spawn {
                program: command.program.clone(),
                source,
            })?;
        let pid = child.id();
        info!(program = %command.program, ?args, pid, port, "started the instance process");
        Ok(Self {
            child,
            pid,
            program: command.program.clone(),
        })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Waits until the child exits on its own. Cancel-safe.
    pub async fn wait(&mut self) -> Result<ExitStatus, ChildError> {
        self.child.wait().await.map_err(ChildError::Wait)
    }

    /// Stops the child: SIGTERM to its process group, up to `timeout` for it to exit, then
    /// SIGKILL to the group. Returns its exit status. Returns at once if it already exited.
    pub async fn stop(&mut self, timeout: Duration) -> Result<ExitStatus, ChildError> {
        if let Some(status) = self.child.try_wait().map_err(ChildError::Wait)? {
            return Ok(status);
        }
        self.signal_group(Signal::SIGTERM);
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                let status = status.map_err(ChildError::Wait)?;
                info!(program = %self.program, %status, "the instance process stopped");
                Ok(status)
            }
            Err(_) => {
                warn!(program = %self.program, ?timeout, "the instance process ignored SIGTERM; sending SIGKILL");
                self.signal_group(Signal::SIGKILL);
                // In case the group could not be signalled, kill the child itself.
                let _ = self.child.start_kill();
                self.child.wait().await.map_err(ChildError::Wait)
            }
        }
    }

    /// Signals the child's process group, while the child is not yet reaped (so the group id
    /// cannot have been reused).
    fn signal_group(&self, signal: Signal) {
        let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) else {
            return;
        };
        if let Err(e) = killpg(Pid::from_raw(pid), signal) {
            debug!(pid, %signal, error = %e, "cannot signal the instance's process group");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> ChildCommand {
        ChildCommand {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    #[test]
    fn substitutes_every_placeholder() {
        let args = vec![
            "--port".to_string(),
            "{port}".to_string(),
            "--bind=127.0.0.1:{port}/{port}".to_string(),
            "{por}".to_string(),
        ];
        assert_eq!(
            substitute_port(&args, 8123),
            vec!["--port", "8123", "--bind=127.0.0.1:8123/8123", "{por}"]
        );
    }

    #[test]
    fn picks_a_loopback_port() {
        let addr = pick_loopback_port().unwrap();
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
    }

    #[tokio::test]
    async fn exit_code_propagates() {
        let mut child = Supervised::spawn(&sh("exit 3"), 1).unwrap();
        assert_eq!(exit_code(child.wait().await.unwrap()), 3);
        let mut child = Supervised::spawn(&sh("kill -TERM $$"), 1).unwrap();
        assert_eq!(exit_code(child.wait().await.unwrap()), 128 + 15);
    }

    #[tokio::test]
    async fn port_reaches_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmd = ChildCommand {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "echo \"$1 $PORT\" > \"$2\"".into(),
                "sh".into(),
                "--port={port}".into(),
                out.display().to_string(),
            ],
        };
        let mut child = Supervised::spawn(&cmd, 4567).unwrap();
        assert!(child.wait().await.unwrap().success());
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "--port=4567 4567\n");
    }

    #[tokio::test]
    async fn stop_terminates_with_sigterm() {
        let mut child = Supervised::spawn(
            &ChildCommand {
                program: "sleep".into(),
                args: vec!["30".into()],
            },
            1,
        )
        .unwrap();
        let started = Instant::now();
        let status = child.stop(Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(status.signal(), Some(15));
        // Stopping again is harmless.
        child.stop(Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn stop_kills_a_child_that_ignores_sigterm() {
        // The shell ignores SIGTERM, and so does its `sleep` (ignored signals are inherited).
        let mut child = Supervised::spawn(&sh("trap '' TERM; sleep 30"), 1).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let status = child.stop(Duration::from_millis(300)).await.unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(status.signal(), Some(9));
    }

    #[test]
    fn spawn_errors_name_the_program() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let e = Supervised::spawn(
            &ChildCommand {
                program: "/nonexistent/usher-test".into(),
                args: vec![],
            },
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/usher-test"), "{e}");
    }
}
