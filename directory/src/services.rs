//! The services the directory scales: `[[services]]` entries of its TOML file, validated into
//! [`ServiceSpec`]s with errors that name the entry and the key.
//!
//! ```toml
//! [[services]]
//! name = "hello"
//! version = "v1"                  # default "v1"
//! scheduler = "process"           # "process" (default), "command" or "kubernetes"
//! command = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
//! health = "http:/"               # the agent's --health: http:PATH, grpc[:SERVICE], tcp
//!                                 # or none; default "tcp"
//! concurrency = 1                 # default 1
//! min_instances = 0               # default 0 (older versions idle to 0 regardless)
//! max_instances = 4               # default 4
//! idle_timeout = "60s"            # default 60s
//! # scale_factor = 1.0, scale_up_factor = 0.9, scale_down_factor = 0.1, scale_down_delay = "5s"
//! # drain_time = "5s"            # a stopped instance serves its requests this long first
//! # scale_command = ["/usr/local/bin/scale", "{service}", "{version}", "{instances}"]  # command
//! # namespace = "default"; deployment = "hello"     # kubernetes (deployment default: name)
//! ```

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use usher_shared::health::HealthSpec;
use usher_shared::names::validate_label;

use crate::autoscale::ScaleSettings;

/// How long a stopped instance drains unless `drain_time` says otherwise.
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(5);

/// Longest `drain_time` accepted (the directory waits for drains when it stops).
pub const MAX_DRAIN_TIME: Duration = Duration::from_secs(300);

/// One `[[services]]` entry as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub name: String,
    pub version: Option<String>,
    pub scheduler: Option<String>,
    pub command: Option<Vec<String>>,
    pub scale_command: Option<Vec<String>>,
    pub namespace: Option<String>,
    pub deployment: Option<String>,
    pub health: Option<String>,
    pub concurrency: Option<u32>,
    pub min_instances: Option<u32>,
    pub max_instances: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub scale_factor: Option<f64>,
    pub scale_up_factor: Option<f64>,
    pub scale_down_factor: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub scale_down_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub drain_time: Option<Duration>,
}

/// How instances of a service version are started and stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedulerSpec {
    /// The directory starts `usher-agent ... -- command` per instance on this host.
    Process { command: Vec<String> },
    /// The directory runs the operator's hook with the desired count (`{service}`,
    /// `{version}`, `{instances}` substituted).
    Command { scale_command: Vec<String> },
    /// The directory sets `spec.replicas` of a Deployment through its scale subresource.
    Kubernetes {
        namespace: String,
        deployment: String,
    },
}

/// A validated service version the directory scales.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub version: String,
    pub scheduler: SchedulerSpec,
    /// The agent's `--health` (`http:PATH`, `tcp`, `none`).
    pub health: String,
    /// The agent's `--drain-time`: how long a stopped instance keeps serving the requests it
    /// has before its process is stopped (longest request you expect; default 5 s).
    pub drain_time: Duration,
    pub scale: ScaleSettings,
}

/// A `[[services]]` entry the directory refuses; the message names the entry and key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("services[{index}].{key}: {reason}")]
pub struct ServiceError {
    pub index: usize,
    pub key: &'static str,
    pub reason: String,
}

/// Validates every entry; two entries for the same name and version are refused.
pub fn validate(entries: &[ServiceEntry]) -> Result<Vec<ServiceSpec>, ServiceError> {
    let mut specs: Vec<ServiceSpec> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let spec = validate_entry(index, entry)?;
        if specs
            .iter()
            .any(|s| s.name == spec.name && s.version == spec.version)
        {
            return Err(ServiceError {
                index,
                key: "version",
                reason: format!("{}/{} is declared twice", spec.name, spec.version),
            });
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn validate_entry(index: usize, e: &ServiceEntry) -> Result<ServiceSpec, ServiceError> {
    let err = |key: &'static str, reason: String| ServiceError { index, key, reason };
    validate_label(&e.name).map_err(|r| err("name", format!("{:?} {r}", e.name)))?;
    let version = e.version.clone().unwrap_or_else(|| "v1".into());
    validate_label(&version).map_err(|r| err("version", format!("{version:?} {r}")))?;
    let nonempty = |key: &'static str, v: &Option<Vec<String>>| match v {
        Some(v) if !v.is_empty() && !v[0].is_empty() => Ok(v.clone()),
        _ => Err(err(
            key,
            "must be a non-empty list: the program, then its arguments".into(),
        )),
    };
    let scheduler = match e.scheduler.as_deref().unwrap_or("process") {
        "process" => SchedulerSpec::Process {
            command: nonempty("command", &e.command)?,
        },
        "command" => SchedulerSpec::Command {
            scale_command: nonempty("scale_command", &e.scale_command)?,
        },
        "kubernetes" => {
            let namespace = e.namespace.clone().unwrap_or_else(|| "default".into());
            validate_label(&namespace)
                .map_err(|r| err("namespace", format!("{namespace:?} {r}")))?;
            let deployment = e.deployment.clone().unwrap_or_else(|| e.name.clone());
            validate_subdomain(&deployment)
                .map_err(|r| err("deployment", format!("{deployment:?} {r}")))?;
            SchedulerSpec::Kubernetes {
                namespace,
                deployment,
            }
        }
        other => {
            return Err(err(
                "scheduler",
                format!("{other:?} is not one of \"process\", \"command\", \"kubernetes\""),
            ))
        }
    };
    if !matches!(scheduler, SchedulerSpec::Kubernetes { .. }) {
        for (key, value) in [("namespace", &e.namespace), ("deployment", &e.deployment)] {
            if value.is_some() {
                return Err(err(
                    key,
                    "applies only to scheduler = \"kubernetes\"".into(),
                ));
            }
        }
    }
    let health = e.health.clone().unwrap_or_else(|| "tcp".into());
    // The agent's own parser: the directory accepts exactly the checks an agent runs.
    if let Err(reason) = HealthSpec::parse(&health) {
        return Err(err("health", format!("{health:?}: {reason}")));
    }
    let defaults = ScaleSettings::default();
    let scale = ScaleSettings {
        concurrency: e.concurrency.unwrap_or(defaults.concurrency),
        min_instances: e.min_instances.unwrap_or(defaults.min_instances),
        max_instances: e.max_instances.unwrap_or(defaults.max_instances),
        scale_factor: e.scale_factor.unwrap_or(defaults.scale_factor),
        scale_up_factor: e.scale_up_factor.unwrap_or(defaults.scale_up_factor),
        scale_down_factor: e.scale_down_factor.unwrap_or(defaults.scale_down_factor),
        idle_timeout: e.idle_timeout.unwrap_or(defaults.idle_timeout),
        scale_down_delay: e.scale_down_delay.unwrap_or(defaults.scale_down_delay),
    };
    if scale.concurrency == 0 {
        return Err(err("concurrency", "must be at least 1".into()));
    }
    if scale.max_instances == 0 || scale.max_instances < scale.min_instances {
        return Err(err(
            "max_instances",
            format!(
                "{} must be at least 1 and at least min_instances ({})",
                scale.max_instances, scale.min_instances
            ),
        ));
    }
    if scale.max_instances > 1000 {
        return Err(err("max_instances", "at most 1000".into()));
    }
    if !(scale.scale_factor.is_finite() && scale.scale_factor > 0.0) {
        return Err(err("scale_factor", "must be a number above 0".into()));
    }
    for (key, f) in [
        ("scale_up_factor", scale.scale_up_factor),
        ("scale_down_factor", scale.scale_down_factor),
    ] {
        if !(f > 0.0 && f <= 1.0) {
            return Err(err(key, format!("{f} must be in (0, 1]")));
        }
    }
    let drain_time = e.drain_time.unwrap_or(DEFAULT_DRAIN_TIME);
    if drain_time <= Duration::from_millis(100) || drain_time > MAX_DRAIN_TIME {
        return Err(err(
            "drain_time",
            "must be longer than the directory's 100ms batch period and at most 5m".into(),
        ));
    }
    Ok(ServiceSpec {
        name: e.name.clone(),
        version,
        scheduler,
        health,
        drain_time,
        scale,
    })
}

/// Checks a Kubernetes object name (DNS-1123 subdomain): dot-separated DNS labels, at most
/// 253 characters.
fn validate_subdomain(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!(
            "is {} characters long; at most 253 are allowed",
            name.len()
        ));
    }
    name.split('.')
        .try_for_each(validate_label)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<ServiceSpec>, String> {
        #[derive(Deserialize)]
        struct File {
            services: Vec<ServiceEntry>,
        }
        let file: File = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        validate(&file.services).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_a_full_entry() {
        let specs = parse(
            r#"
            [[services]]
            name = "hello"
            command = ["python3", "-m", "http.server", "{port}"]

            [[services]]
            name = "hello"
            version = "v2"
            scheduler = "command"
            scale_command = ["/bin/scale", "{service}", "{version}", "{instances}"]
            health = "http:/healthz"
            concurrency = 4
            min_instances = 1
            max_instances = 10
            idle_timeout = "5m"
            scale_down_delay = "10s"

            [[services]]
            name = "hello"
            version = "v3"
            scheduler = "kubernetes"
            "#,
        )
        .unwrap();
        assert_eq!(specs[0].version, "v1");
        assert_eq!(specs[0].health, "tcp");
        assert_eq!(specs[0].scale, ScaleSettings::default());
        assert!(matches!(specs[0].scheduler, SchedulerSpec::Process { .. }));
        assert_eq!(specs[1].scale.concurrency, 4);
        assert_eq!(specs[1].scale.idle_timeout, Duration::from_secs(300));
        assert!(matches!(specs[1].scheduler, SchedulerSpec::Command { .. }));
        assert_eq!(
            specs[2].scheduler,
            SchedulerSpec::Kubernetes {
                namespace: "default".into(),
                deployment: "hello".into()
            }
        );
    }

    #[test]
    fn bad_entries_name_the_entry_and_key() {
        for (text, named) in [
            ("name = \"Hello\"\ncommand = [\"x\"]", "services[0].name"),
            ("name = \"a\"", "services[0].command"),
            ("name = \"a\"\ncommand = []", "services[0].command"),
            (
                "name = \"a\"\ncommand = [\"x\"]\nmax_instances = 0",
                "services[0].max_instances",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\nmin_instances = 3\nmax_instances = 2",
                "services[0].max_instances",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\nconcurrency = 0",
                "services[0].concurrency",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\nscale_up_factor = 1.5",
                "services[0].scale_up_factor",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\nhealth = \"udp\"",
                "services[0].health",
            ),
            (
                "name = \"a\"\nscheduler = \"kubernetes\"\ndeployment = \"Web_1\"",
                "services[0].deployment",
            ),
            (
                "name = \"a\"\nscheduler = \"kubernetes\"\nnamespace = \"a.b\"",
                "services[0].namespace",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\ndeployment = \"web\"",
                "services[0].deployment",
            ),
            (
                "name = \"a\"\nscheduler = \"nomad\"",
                "services[0].scheduler",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\ndrain_time = \"50ms\"",
                "services[0].drain_time",
            ),
            (
                "name = \"a\"\ncommand = [\"x\"]\ndrain_time = \"1h\"",
                "services[0].drain_time",
            ),
            (
                "name = \"a\"\nscheduler = \"command\"",
                "services[0].scale_command",
            ),
        ] {
            let e = parse(&format!("[[services]]\n{text}\n")).unwrap_err();
            assert!(e.contains(named), "{text:?}: {e}");
        }
        let e = parse("[[services]]\nname = \"a\"\ncommand = [\"x\"]\n[[services]]\nname = \"a\"\ncommand = [\"y\"]\n")
            .unwrap_err();
        assert!(
            e.contains("services[1].version") && e.contains("twice"),
            "{e}"
        );
        let e = parse("[[services]]\nname = \"a\"\ncommand = [\"x\"]\nmax = 3\n").unwrap_err();
        assert!(e.contains("max"), "{e}");
    }
}
