//! Harness for usher's end-to-end tests: starts the real `usher-directory`, `usher-agent`,
//! `usher-sidecar` and `usher-test-server` binaries on loopback, sends real HTTP requests and
//! reads the admin APIs.
//!
//! # Layout
//!
//! - [`Process`]: a child process whose output goes to a log file, killed on drop; its log is
//!   printed when a test fails.
//! - [`Mesh`]: one test's directory, agents and sidecars, sharing a temporary folder and ports.
//! - [`http`]: a minimal HTTP/1.1 client (hyper) that can send origin- or absolute-form requests.
//! - [`instance`]: the service instance (`usher-test-server`, or in process), HTTP/1.1 and
//!   h2c.
//! - [`websocket`]: the instance's side of a WebSocket (echo), for `usher-test-server` and the
//!   sidecar's tests.
#![forbid(unsafe_code)]

pub mod http;
pub mod instance;
pub mod websocket;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Heartbeat interval the tests give the directory (the production default).
pub const HEARTBEAT: &str = "1s";

/// The folder holding the workspace's binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let mut dir = exe.parent().expect("deps dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary; panics with advice if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace` (it builds every binary)",
        path.display()
    );
    path
}

/// The environment `deploy/systemd/usher-directory.service` gives the directory (its
/// `Environment=` lines), which the harness gives every directory it starts, so that tests and
/// benchmarks run it as deployed.
pub fn directory_unit_environment() -> Vec<(String, String)> {
    unit_environment(include_str!("../../deploy/systemd/usher-directory.service"))
}

/// The variables a systemd unit's `Environment=` lines set: `NAME=value` assignments separated
/// by spaces, each optionally in double quotes (without escapes, which the units here do not
/// use).
pub fn unit_environment(unit: &str) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for line in unit.lines() {
        let Some(assignments) = line.trim().strip_prefix("Environment=") else {
            continue;
        };
        let mut quoted = false;
        for word in assignments.split(|c: char| {
            if c == '"' {
                quoted = !quoted;
            }
            c.is_whitespace() && !quoted
        }) {
            let word: String = word.chars().filter(|&c| c != '"').collect();
            if let Some((name, value)) = word.split_once('=') {
                vars.push((name.to_string(), value.to_string()));
            }
        }
    }
    vars
}

/// A free loopback TCP port for a child process to listen on.
pub fn free_tcp_port() -> u16 {
    free_port(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// A free loopback UDP port for a child process to bind.
pub fn free_udp_port() -> u16 {
    free_port(|port| UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// Ports below this are never the kernel's ephemeral ports (Linux's default range starts at
/// 32768, `/proc/sys/net/ipv4/ip_local_port_range`).
const EPHEMERAL_START: u16 = 32_768;

/// Ports handed out come from the `PORT_SPAN` ports below [`EPHEMERAL_START`].
const PORT_SPAN: u16 = 12_000;

/// The next port this process tries: each port is handed out once, so two tests of one
/// binary never get the same port.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port that `bindable` accepts, released again for a child process to take. Taken from
/// below the kernel's ephemeral range: a port the kernel picked (bind to port 0) could be
/// handed by the kernel to any outgoing connection of a concurrent test between this check
/// and the child's bind ("Address already in use"); a port below the range is only ever
/// taken by a bind that names it. Each test binary starts at an offset of its own (its pid),
/// so binaries run one after another rarely meet a port still held by an earlier one.
fn free_port(bindable: impl Fn(u16) -> bool) -> u16 {
    let base = EPHEMERAL_START - PORT_SPAN;
    let _ = NEXT_PORT.compare_exchange(
        0,
        (std::process::id() % u32::from(PORT_SPAN)) as u16 + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..PORT_SPAN {
        let offset = NEXT_PORT.fetch_add(1, Ordering::Relaxed) % PORT_SPAN;
        let port = base + offset;
        if bindable(port) {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{EPHEMERAL_START}");
}

/// A child process of a test. Killed (SIGKILL) on drop; its log is printed if the test failed.
pub struct Process {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program args` with stdout and stderr appended to `<dir>/<name>.log`.
    pub fn start(name: &str, dir: &Path, program: &Path, args: &[String]) -> Result<Self> {
        Self::start_with_env(name, dir, program, args, &[])
    }

    /// Starts `program args` as [`Process::start`] does, with the variables of `env` added to
    /// its environment. glibc's tunables are not inherited from the harness (a benchmark may
    /// set them for itself): a process gets those of `env` only, as its unit sets them.
    pub fn start_with_env(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .env("USHER_LOG", "info,usher=debug")
            .env("USHER_LOG_TEXT", "1")
            .env_remove("GLIBC_TUNABLES")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// SIGKILL and reap. Processes it started (an agent's instance, which lives in its own
    /// process group) are killed too, so no test leaves a process behind.
    pub fn kill(&mut self) {
        let descendants = descendants(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in descendants {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code (128+signal if
    /// killed), or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(
                    status
                        .code()
                        .or_else(|| status.signal().map(|s| 128 + s))
                        .unwrap_or(-1),
                );
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Every process below `pid`, children first (from `/proc/<pid>/task/*/children`).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for task in tasks {
        let children = std::fs::read_to_string(task.join("children")).unwrap_or_default();
        for child in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            found.push(child);
            found.extend(descendants(child));
        }
    }
    found
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log());
        }
    }
}

/// Ports and folders of one directory.
#[derive(Debug, Clone)]
pub struct DirectoryAddrs {
    pub quic_port: u16,
    /// The join endpoint (enrolment and renewal), UDP.
    pub join_port: u16,
    pub admin_port: u16,
    pub state_dir: PathBuf,
}

impl DirectoryAddrs {
    pub fn quic(&self) -> String {
        format!("127.0.0.1:{}", self.quic_port)
    }
    pub fn join(&self) -> String {
        format!("127.0.0.1:{}", self.join_port)
    }
    pub fn admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }
    pub fn ca(&self) -> PathBuf {
        self.state_dir.join("ca.pem")
    }
}

/// A sidecar's ports.
#[derive(Debug, Clone)]
pub struct SidecarAddrs {
    pub proxy_port: u16,
    pub admin_port: u16,
    pub state_dir: PathBuf,
}

impl SidecarAddrs {
    pub fn proxy(&self) -> String {
        format!("127.0.0.1:{}", self.proxy_port)
    }
    pub fn admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }
}

/// One test's mesh: a temporary folder, the directory's addresses, and helpers to start the
/// three binaries against it.
pub struct Mesh {
    pub tmp: tempfile::TempDir,
    pub directory: DirectoryAddrs,
    /// Join tokens made so far, by `(role, service)`: every node of a kind shares one.
    tokens: std::sync::Mutex<std::collections::BTreeMap<(String, String), String>>,
}

impl Mesh {
    pub fn new() -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let directory = DirectoryAddrs {
            quic_port: free_udp_port(),
            join_port: free_udp_port(),
            admin_port: free_tcp_port(),
            state_dir: tmp.path().join("directory"),
        };
        Ok(Self {
            tmp,
            directory,
            tokens: Default::default(),
        })
    }

    /// Runs `usher-directory ARGS` against this mesh's directory (its admin port and state
    /// directory, hence its admin token) and returns the output.
    pub fn directory_cli(&self, args: &[&str]) -> Result<std::process::Output> {
        let d = &self.directory;
        Command::new(bin("usher-directory"))
            .args(["--admin", &d.admin()])
            .arg("--state-dir")
            .arg(&d.state_dir)
            .args(args)
            .env_remove("USHER_DIRECTORY_ADMIN_TOKEN_FILE")
            .output()
            .context("run usher-directory")
    }

    /// Creates a join token with the real CLI (`token create --role ROLE [--service S]
    /// [--ttl TTL]`) and returns its text.
    pub fn create_token(
        &self,
        role: &str,
        service: Option<&str>,
        ttl: Option<&str>,
    ) -> Result<String> {
        let mut args = vec!["token", "create", "--role", role];
        if let Some(service) = service {
            args.extend(["--service", service]);
        }
        if let Some(ttl) = ttl {
            args.extend(["--ttl", ttl]);
        }
        let out = self.directory_cli(&args)?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// How every node the harness starts gets its certificate: the real join flow, with a
    /// token per `(role, service)` made once by the CLI. Returns the node's flags
    /// (`--join-token T --join-address ADDR`).
    pub fn join_flags(&self, role: &str, service: Option<&str>) -> Result<Vec<String>> {
        let key = (role.to_string(), service.unwrap_or_default().to_string());
        let cached = self
            .tokens
            .lock()
            .map_err(|_| anyhow::anyhow!("token cache poisoned"))?
            .get(&key)
            .cloned();
        let token = match cached {
            Some(token) => token,
            None => {
                let token = self.create_token(role, service, None)?;
                self.tokens
                    .lock()
                    .map_err(|_| anyhow::anyhow!("token cache poisoned"))?
                    .insert(key, token.clone());
                token
            }
        };
        Ok(vec![
            "--join-token".into(),
            token,
            "--join-address".into(),
            self.directory.join(),
        ])
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// Starts the directory and waits until its admin port answers `/healthz` and `ca.pem`
    /// exists.
    pub async fn start_directory(&self, name: &str) -> Result<Process> {
        self.start_directory_with(name, HEARTBEAT, &[]).await
    }

    /// Starts the directory as [`Mesh::start_directory`] does, but dictating a heartbeat every
    /// `interval` (a duration such as `"3s"`) instead of [`HEARTBEAT`].
    pub async fn start_directory_heartbeating(
        &self,
        name: &str,
        interval: &str,
    ) -> Result<Process> {
        self.start_directory_with(name, interval, &[]).await
    }

    /// Starts the directory with a TOML file holding `toml` (for example `[[services]]`
    /// entries), as [`Mesh::start_directory`] does otherwise.
    pub async fn start_directory_with_config(&self, name: &str, toml: &str) -> Result<Process> {
        self.start_directory_heartbeating_with_config(name, HEARTBEAT, toml)
            .await
    }

    /// Starts the directory as [`Mesh::start_directory_with_config`] does, but dictating a
    /// heartbeat every `interval` (the command line's `--heartbeat-interval`, which overrides
    /// the file's).
    pub async fn start_directory_heartbeating_with_config(
        &self,
        name: &str,
        interval: &str,
        toml: &str,
    ) -> Result<Process> {
        let path = self.dir().join(format!("{name}.toml"));
        std::fs::write(&path, toml)?;
        let extra = ["--config".into(), path.display().to_string()];
        self.start_directory_with(name, interval, &extra).await
    }

    async fn start_directory_with(
        &self,
        name: &str,
        heartbeat: &str,
        extra: &[String],
    ) -> Result<Process> {
        let d = &self.directory;
        let mut args = vec![
            "--listen".into(),
            d.quic(),
            "--join-listen".into(),
            d.join(),
            "--admin".into(),
            d.admin(),
            "--state-dir".into(),
            d.state_dir.display().to_string(),
            "--heartbeat-interval".into(),
            heartbeat.into(),
        ];
        args.extend(extra.iter().cloned());
        let process = Process::start_with_env(
            name,
            self.dir(),
            &bin("usher-directory"),
            &args,
            &directory_unit_environment(),
        )?;
        let admin = d.admin();
        let token = d.state_dir.join("admin-token");
        wait_until(Duration::from_secs(20), "directory to serve", || {
            let admin = admin.clone();
            let token = token.clone();
            async move { token.exists() && http::get(&admin, "localhost", "/healthz").await.is_ok() }
        })
        .await?;
        Ok(process)
    }

    /// Starts an agent supervising a `usher-test-server` named `name` for `service`; it joins
    /// with the harness's agent token for `service` ([`Mesh::join_flags`]).
    pub fn start_agent(&self, name: &str, service: &str, extra: &[&str]) -> Result<Process> {
        self.start_agent_as(
            name,
            service,
            &self.join_flags("agent", Some(service))?,
            extra,
        )
    }

    /// Starts an agent as [`Mesh::start_agent`] does, with `credentials` instead of the
    /// harness's join flags (a test's own token, or `--ca/--cert/--key`).
    pub fn start_agent_as(
        &self,
        name: &str,
        service: &str,
        credentials: &[String],
        extra: &[&str],
    ) -> Result<Process> {
        let command = [
            bin("usher-test-server").display().to_string(),
            "--port".into(),
            "{port}".into(),
            "--name".into(),
            name.into(),
        ];
        self.start_agent_running(name, service, credentials, extra, "http:/health", &command)
    }

    /// Starts an agent as [`Mesh::start_agent_as`] does, health-checking with `health` (its
    /// `--health`) and running `command` as its instance (`{port}` is the port the agent
    /// picks).
    pub fn start_agent_running(
        &self,
        name: &str,
        service: &str,
        credentials: &[String],
        extra: &[&str],
        health: &str,
        command: &[String],
    ) -> Result<Process> {
        let mut args: Vec<String> = vec![
            "--directory".into(),
            self.directory.quic(),
            "--service".into(),
            service.into(),
            "--admin".into(),
            format!("127.0.0.1:{}", free_tcp_port()),
            "--state-dir".into(),
            self.dir()
                .join(format!("agent-{name}"))
                .display()
                .to_string(),
            "--health".into(),
            health.into(),
            "--health-interval".into(),
            "200ms".into(),
        ];
        args.extend(credentials.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--".into());
        args.extend(command.iter().cloned());
        Process::start(
            &format!("agent-{name}"),
            self.dir(),
            &bin("usher-agent"),
            &args,
        )
    }

    /// The agent admin address given to `start_agent` (read back from its command line).
    pub fn agent_admin(agent: &Process) -> Result<String> {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid()))?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        args.windows(2)
            .find(|w| w[0] == "--admin")
            .map(|w| w[1].clone())
            .context("agent has no --admin")
    }

    /// Ports and state folder for a sidecar called `name` (reused across restarts).
    pub fn sidecar_addrs(&self, name: &str) -> SidecarAddrs {
        SidecarAddrs {
            proxy_port: free_tcp_port(),
            admin_port: free_tcp_port(),
            state_dir: self.dir().join(format!("sidecar-{name}")),
        }
    }

    /// Starts a sidecar at `addrs` and waits until its admin port answers; it joins with the
    /// harness's sidecar token ([`Mesh::join_flags`]).
    pub async fn start_sidecar(&self, name: &str, addrs: &SidecarAddrs) -> Result<Process> {
        let credentials = self.join_flags("sidecar", None)?;
        self.start_sidecar_as(name, addrs, &credentials).await
    }

    /// Starts a sidecar as [`Mesh::start_sidecar`] does, with `credentials` instead of the
    /// harness's join flags (a test's own token, or `--ca/--cert/--key`).
    pub async fn start_sidecar_as(
        &self,
        name: &str,
        addrs: &SidecarAddrs,
        credentials: &[String],
    ) -> Result<Process> {
        let mut args = vec![
            "--directory".into(),
            self.directory.quic(),
            "--listen".into(),
            addrs.proxy(),
            "--admin".into(),
            addrs.admin(),
            "--state-dir".into(),
            addrs.state_dir.display().to_string(),
            "--queue-timeout".into(),
            "5s".into(),
        ];
        args.extend(credentials.iter().cloned());
        let process = Process::start(name, self.dir(), &bin("usher-sidecar"), &args)?;
        let admin = addrs.admin();
        wait_until(Duration::from_secs(20), "sidecar to serve", || {
            let admin = admin.clone();
            async move { http::get(&admin, "localhost", "/healthz").await.is_ok() }
        })
        .await?;
        Ok(process)
    }
}

/// Polls `check` every 50 ms until it is true; errors after `timeout` naming `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GETs `path` from an admin port and parses the JSON.
pub async fn admin_json(admin: &str, path: &str) -> Result<Value> {
    let resp = http::get(admin, "localhost", path).await?;
    if resp.status != 200 {
        bail!("GET {path} on {admin}: status {}", resp.status);
    }
    Ok(serde_json::from_slice(&resp.body)?)
}

/// GETs `/metrics` from an admin port: the Prometheus text (read it with
/// [`usher_shared::metrics::sample`]).
pub async fn admin_metrics(admin: &str) -> Result<String> {
    let resp = http::get(admin, "localhost", "/metrics").await?;
    if resp.status != 200 {
        bail!("GET /metrics on {admin}: status {}", resp.status);
    }
    Ok(String::from_utf8(resp.body.to_vec())?)
}

/// One sample of the `/metrics` at admin port `admin`, by series name (such as
/// `usher_directory_load_reports_total`); an error if it is not exported.
pub async fn admin_metric(admin: &str, name: &str) -> Result<f64> {
    let text = admin_metrics(admin).await?;
    usher_shared::metrics::sample(&text, name)
        .with_context(|| format!("no {name} in the /metrics of {admin}"))
}

/// The `instances` array of a `/v1/routes` document (the directory's or a sidecar's); empty
/// when the document has none.
pub fn instances(routes: &Value) -> &[Value] {
    routes["instances"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
}

/// The instances in a `/v1/routes` document for `service` whose state is `state`, by id.
pub fn instances_in(routes: &Value, service: &str, state: &str) -> Vec<String> {
    let mut ids: Vec<String> = instances(routes)
        .iter()
        .filter(|i| i["service"] == service && i["state"] == state)
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    ids.sort();
    ids
}

/// Waits until the sidecar at `admin` routes `count` `up` instances of `service`.
pub async fn wait_for_up(
    admin: &str,
    service: &str,
    count: usize,
    timeout: Duration,
) -> Result<Duration> {
    wait_until(
        timeout,
        &format!("{count} up instances of {service} at {admin}"),
        || async move {
            admin_json(admin, "/v1/routes")
                .await
                .map(|r| instances_in(&r, service, "up").len() == count)
                .unwrap_or(false)
        },
    )
    .await
}

/// Outcome of a [`Load`]: how many requests succeeded and what the failures were.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: usize,
    pub failures: Vec<String>,
    pub instances: std::collections::BTreeSet<String>,
}

/// Requests sent continuously to a sidecar by a few concurrent clients until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts `clients` loops each sending `GET /` with `Host: host` to `proxy`, every `pace`.
    pub fn start(proxy: &str, host: &str, clients: usize, pace: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (proxy, host, stop) = (proxy.to_string(), host.to_string(), stop.clone());
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match http::get(&proxy, &host, "/").await {
                            Ok(r) if r.status == 200 => {
                                report.ok += 1;
                                report.instances.extend(r.instance());
                            }
                            Ok(r) => {
                                report
                                    .failures
                                    .push(format!("{} {}", r.status, r.text().trim()))
                            }
                            Err(e) => report.failures.push(format!("{e:#}")),
                        }
                        tokio::time::sleep(pace).await;
                    }
                    report
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the clients and sums their reports.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadReport::default();
        for task in self.tasks {
            if let Ok(r) = task.await {
                total.ok += r.ok;
                total.failures.extend(r.failures);
                total.instances.extend(r.instances);
            }
        }
        total
    }
}

/// A program some tests need beyond the Rust toolchain (`node`, `chromium`, for the directory's
/// dashboard): its name, or `None` when it does not run here (the caller skips, saying so).
/// With `USHER_TESTS_REQUIRE_TOOLS` set, as `.ci/run` sets it after installing them, a missing
/// one fails instead of skipping.
pub fn optional_tool(program: &str) -> Option<PathBuf> {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(PathBuf::from(program));
    }
    missing(&format!("`{program}`"), "nodejs chromium")
}

/// A tool a check needs is missing (`what`; Debian's `package` has it): `None` after a note,
/// or a failure under `USHER_TESTS_REQUIRE_TOOLS`.
fn missing(what: &str, package: &str) -> Option<PathBuf> {
    assert!(
        std::env::var_os("USHER_TESTS_REQUIRE_TOOLS").is_none(),
        "USHER_TESTS_REQUIRE_TOOLS is set but {what} is missing (.ci/run installs {package})"
    );
    eprintln!("skipped: this check needs {what} (Debian: apt install {package})");
    None
}

/// A Python 3 that has gRPC's own library (`import grpc`; Debian: `apt install python3-grpcio`,
/// which goes to `/usr/bin/python3` even where another `python3` comes first on `PATH`), or
/// `None` after a note (a failure under `USHER_TESTS_REQUIRE_TOOLS`, as
/// [`optional_tool`]).
pub fn python_with_grpc() -> Option<PathBuf> {
    for python in ["python3", "/usr/bin/python3"] {
        // The interpreter's own path: a version manager's `python3` shim may pick another
        // interpreter in another working directory (the agent's instance runs in its own).
        let found = Command::new(python)
            .args(["-c", "import sys, grpc; print(sys.executable)"])
            .current_dir("/")
            .stderr(Stdio::null())
            .output();
        if let Ok(found) = found {
            let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
            if found.status.success() && !path.is_empty() {
                return Some(PathBuf::from(path));
            }
        }
    }
    missing("a python3 that imports grpc", "python3-grpcio")
}

/// The DOM of the page at `url` once headless Chromium (`chromium`) has run its scripts for
/// up to 3 s of virtual time (`--dump-dom`), within 60 s.
pub async fn browser_dom(chromium: &Path, url: &str) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let run = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            // Tests run as root in CI, where Chromium's sandbox refuses to start.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .context("chromium took over 60 s")?
        .context("run chromium")?;
    Ok(String::from_utf8(succeeded("chromium", out)?)?)
}

/// The standard output of a finished `program`, or an error with its status and standard error.
fn succeeded(program: &str, out: std::process::Output) -> Result<Vec<u8>> {
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// Runs the directory's dashboard script (`script`, as served at `/dashboard.js`) under
/// `node` on a `GET /v1/services` and a `GET /v1/routes` document: its `model(services,
/// routes, now_ms)`, the rows the page would show.
pub fn dashboard_model(
    node: &Path,
    script: &[u8],
    services: &Value,
    routes: &Value,
    now_ms: u64,
) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let file = |name: &str, bytes: &[u8]| -> Result<PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        Ok(path)
    };
    let script = file("dashboard.js", script)?;
    let services = file("services.json", &serde_json::to_vec(services)?)?;
    let routes = file("routes.json", &serde_json::to_vec(routes)?)?;
    let program = "const fs = require('fs'); \
        const [script, services, routes, now] = process.argv.slice(1); \
        const read = (f) => JSON.parse(fs.readFileSync(f, 'utf8')); \
        const model = require(script).model(read(services), read(routes), Number(now)); \
        process.stdout.write(JSON.stringify(model));";
    let out = Command::new(node)
        .arg("-e")
        .arg(program)
        .arg(&script)
        .arg(&services)
        .arg(&routes)
        .arg(now_ms.to_string())
        .output()
        .context("run node")?;
    Ok(serde_json::from_slice(&succeeded("node", out)?)?)
}

/// A `[[services]]` entry of the directory's configuration: one version of `name` that the
/// directory scales with its `process` scheduler, concurrency 1, at most 3 instances, quick to
/// idle (3 s) and to step down so the tests are short. Its test servers answer with
/// `name-version`, except `v1`'s, which answer with `name`.
pub fn scaled_version(name: &str, version: &str, min_instances: u32) -> String {
    let server = if version == "v1" {
        name.to_string()
    } else {
        format!("{name}-{version}")
    };
    format!(
        r#"
[[services]]
name = "{name}"
version = "{version}"
min_instances = {min_instances}
command = ["{}", "--port", "{{port}}", "--name", "{server}"]
health = "http:/health"
concurrency = 1
max_instances = 3
idle_timeout = "3s"
scale_down_delay = "1s"
scale_down_factor = 0.6
drain_time = "1s"
"#,
        bin("usher-test-server").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_units_environment_lines_are_read_in_order() {
        let unit = "[Service]\n\
                    Environment=A=1 B=two\n\
                    EnvironmentFile=-/etc/x.env\n\
                    # Environment=C=commented\n\
                    Environment=\"D=with space\" E=\n";
        assert_eq!(
            unit_environment(unit),
            pairs(&[("A", "1"), ("B", "two"), ("D", "with space"), ("E", "")])
        );
    }

    #[test]
    fn a_process_gets_glibc_tunables_from_its_unit_not_from_the_harness() {
        // The only test here that starts a process or reads the environment.
        std::env::set_var("GLIBC_TUNABLES", "glibc.malloc.arena_max=1");
        let dir = tempfile::tempdir().unwrap();
        let program = Path::new("/usr/bin/env");
        let mut plain = Process::start("plain", dir.path(), program, &[]).unwrap();
        assert_eq!(plain.wait_exit(Duration::from_secs(10)), Some(0));
        assert!(!plain.log().contains("GLIBC_TUNABLES"), "{}", plain.log());
        let unit = [("GLIBC_TUNABLES".into(), "glibc.malloc.hugetlb=1".into())];
        let mut deployed =
            Process::start_with_env("unit", dir.path(), program, &[], &unit).unwrap();
        assert_eq!(deployed.wait_exit(Duration::from_secs(10)), Some(0));
        assert!(
            deployed
                .log()
                .contains("GLIBC_TUNABLES=glibc.malloc.hugetlb=1\n"),
            "{}",
            deployed.log()
        );
    }

    #[test]
    fn the_directory_runs_as_its_unit_sets_it() {
        assert!(directory_unit_environment()
            .contains(&("GLIBC_TUNABLES".into(), "glibc.malloc.hugetlb=1".into())));
    }
}
