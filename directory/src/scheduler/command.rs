//! The `command` backend: runs the operator's `scale_command` with the desired count
//! (`{service}`, `{version}`, `{instances}` substituted), for systemd template units, Nomad,
//! anything. A failing hook is logged with its output and retried with backoff (1 s doubling
//! to 60 s); the hook is run again only when the count changes.

use std::process::Stdio;

use tokio::process::Command;
use tokio::time::Instant;
use tracing::info;

use super::{Applier, Observed, Scheduler, SchedulerError, HOOK_TIMEOUT};
use crate::services::ServiceSpec;

/// Runs the operator's hook with the desired count.
#[derive(Debug)]
pub struct CommandScheduler {
    spec: ServiceSpec,
    scale_command: Vec<String>,
    applier: Applier,
}

impl CommandScheduler {
    pub fn new(spec: &ServiceSpec, scale_command: &[String]) -> Self {
        CommandScheduler {
            spec: spec.clone(),
            scale_command: scale_command.to_vec(),
            applier: Applier::default(),
        }
    }

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
        self.applier.applied().unwrap_or(0)
    }

    async fn scale(&mut self, desired: u32, _: &Observed) -> Result<(), SchedulerError> {
        if !self.applier.due(desired, Instant::now()) {
            return Ok(());
        }
        let result = self.run_hook(desired).await;
        if result.is_ok() {
            info!(service = %self.spec.name, version = %self.spec.version, instances = desired,
                  "scale command applied");
        }
        self.applier.record(desired, &result, Instant::now());
        result
    }

    async fn shutdown(&mut self) {
        // The operator's instances are theirs: a directory shutdown leaves them running.
    }
}
