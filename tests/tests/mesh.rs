//! End-to-end tests of the whole mesh: the real `usher-directory`, `usher-agent` and
//! `usher-sidecar` binaries on loopback, with `usher-test-server` instances, real requests.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use usher_shared::metrics::sample;
use usher_tests::{
    admin_json, admin_metric, admin_metrics, http, instances_in, wait_for_up, wait_until, Load,
    Mesh, Process, HEARTBEAT,
};

/// A mesh with a directory, `n` agents of `web` (instances `web-1`..`web-n`) and one sidecar.
struct Running {
    directory: Process,
    agents: Vec<Process>,
    sidecar: Process,
    sidecar_addrs: usher_tests::SidecarAddrs,
    /// Last: its folder (with the logs) outlives the processes, which print them on failure.
    mesh: Mesh,
}

async fn mesh_with(n: usize) -> Running {
    mesh_configured(n, None).await
}

/// As [`mesh_with`], the directory started with a TOML file holding `directory_toml`, if any.
async fn mesh_configured(n: usize, directory_toml: Option<&str>) -> Running {
    mesh_heartbeating(n, HEARTBEAT, directory_toml).await
}

/// [`mesh_configured`] with a directory that dictates a heartbeat every `interval`.
async fn mesh_heartbeating(n: usize, interval: &str, directory_toml: Option<&str>) -> Running {
    let mesh = Mesh::new().unwrap();
    let directory = match directory_toml {
        Some(toml) => {
            mesh.start_directory_heartbeating_with_config("directory", interval, toml)
                .await
        }
        None => {
            mesh.start_directory_heartbeating("directory", interval)
                .await
        }
    }
    .unwrap();
    let agents = (1..=n)
        .map(|i| mesh.start_agent(&format!("web-{i}"), "web", &[]).unwrap())
        .collect();
    let sidecar_addrs = mesh.sidecar_addrs("a");
    let sidecar = mesh.start_sidecar("sidecar", &sidecar_addrs).await.unwrap();
    wait_for_up(&sidecar_addrs.admin(), "web", n, Duration::from_secs(20))
        .await
        .unwrap();
    Running {
        mesh,
        directory,
        agents,
        sidecar,
        sidecar_addrs,
    }
}

async fn instance_child_pid(agent: &Process) -> i32 {
    let admin = Mesh::agent_admin(agent).unwrap();
    let doc = admin_json(&admin, "/v1/instance").await.unwrap();
    doc["child_pid"]
        .as_i64()
        .expect("agent reports its child's pid") as i32
}

fn kill_pid(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
}

/// 1. Requests through the sidecar reach all 3 instances, by `Host` and by `http_proxy`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_every_instance_by_host_and_by_proxy_form() {
    let m = mesh_with(3).await;
    let proxy = m.sidecar_addrs.proxy();
    let mut by_host = BTreeSet::new();
    let mut by_proxy = BTreeSet::new();
    for _ in 0..30 {
        let r = http::get(&proxy, "web", "/").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        by_host.extend(r.instance());
        // What curl sends with http_proxy=http://127.0.0.1:7410: an absolute-form target.
        let r = http::get(&proxy, "web", "http://web/").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        by_proxy.extend(r.instance());
    }
    let all: BTreeSet<String> = ["web-1", "web-2", "web-3"].map(String::from).into();
    assert_eq!(by_host, all);
    assert_eq!(by_proxy, all);
    // Host with the sidecar's port and with an explicit version also route.
    let r = http::get(&proxy, &format!("web:{}", m.sidecar_addrs.proxy_port), "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = http::get(&proxy, "v1.web", "/").await.unwrap();
    assert_eq!(r.status, 200);
    let r = http::get(&proxy, "v9.web", "/").await.unwrap();
    assert_eq!(r.status, 404, "unknown version: {}", r.text());

    // Each process's GET /metrics says the same.
    let web = r#"service="web",version="v1""#;
    let expect = |text: &str, series: String, value: f64| {
        assert_eq!(sample(text, &series), Some(value), "{series} in\n{text}");
    };
    let sidecar = admin_metrics(&m.sidecar_addrs.admin()).await.unwrap();
    expect(
        &sidecar,
        format!(r#"usher_sidecar_requests_total{{{web},outcome="answered"}}"#),
        62.0,
    );
    expect(
        &sidecar,
        r#"usher_sidecar_unrouted_requests_total{code="404"}"#.into(),
        1.0,
    );
    expect(&sidecar, "usher_sidecar_directory_connected".into(), 1.0);
    let directory = admin_metrics(&m.mesh.directory.admin()).await.unwrap();
    expect(
        &directory,
        format!("usher_directory_routable_instances{{{web}}}"),
        3.0,
    );
    expect(
        &directory,
        r#"usher_directory_subscriptions{encoding="compact"}"#.into(),
        1.0,
    );
    let agent = admin_metrics(&Mesh::agent_admin(&m.agents[0]).unwrap())
        .await
        .unwrap();
    expect(&agent, "usher_agent_directory_connected".into(), 1.0);
    assert!(agent.contains(r#"state="up"} 1"#), "{agent}");
}

/// 2. SIGKILL of an instance's process fails no client request, and it leaves the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_instance_fails_no_request_and_leaves_the_table() {
    let mut m = mesh_with(3).await;
    let proxy = m.sidecar_addrs.proxy();
    let load = Load::start(&proxy, "web", 4, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = instance_child_pid(&m.agents[0]).await;
    kill_pid(pid);
    // The agent withdraws the instance and exits with its child's status (128 + SIGKILL).
    let code = tokio::task::block_in_place(|| m.agents[0].wait_exit(Duration::from_secs(5)));
    assert_eq!(code, Some(128 + 9), "agent exits with the child's status");
    let admin = m.sidecar_addrs.admin();
    wait_until(
        Duration::from_secs(4),
        "the killed instance to leave the sidecar's table",
        || async {
            let routes = admin_json(&admin, "/v1/routes").await.unwrap();
            routes["instances"].as_array().unwrap().len() == 2
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    assert!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
    assert!(report.ok > 50, "load ran: {} requests", report.ok);
    let directory = admin_json(&m.mesh.directory.admin(), "/v1/routes")
        .await
        .unwrap();
    assert_eq!(instances_in(&directory, "web", "up").len(), 2);
    // The sidecar of this build asks for the compact feed (a named one would route as well).
    assert_eq!(
        directory["subscribers"],
        serde_json::json!({"named": 0, "compact": 1})
    );
}

/// 3. SIGKILL of an agent and its instance removes it from the sidecar's table within 4 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_is_withdrawn_within_four_seconds() {
    let mut m = mesh_with(3).await;
    let pid = instance_child_pid(&m.agents[2]).await;
    let killed_at = Instant::now();
    m.agents[2].kill();
    kill_pid(pid);
    let admin = m.sidecar_addrs.admin();
    wait_until(
        Duration::from_secs(4),
        "the instance to be withdrawn",
        || async {
            let routes = admin_json(&admin, "/v1/routes").await.unwrap();
            routes["instances"].as_array().unwrap().len() == 2
        },
    )
    .await
    .unwrap();
    assert!(killed_at.elapsed() < Duration::from_secs(4));
    // The other two still serve.
    let r = http::get(&m.sidecar_addrs.proxy(), "web", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// 3a. An agent paused past its TTL (SIGSTOP: a hung host) is withdrawn; resumed, its
///     heartbeat is refused ("not registered") and it registers again over the QUIC
///     connection it has, without a new handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_ttl_lapsed_registers_again_over_its_connection() {
    let m = mesh_with(1).await;
    let dir_admin = m.mesh.directory.admin();
    let handshakes = || async {
        admin_metric(&dir_admin, "usher_directory_handshakes_completed_total")
            .await
            .unwrap()
    };
    let before = handshakes().await;
    // Resumed as soon as the TTL (3 heartbeats of 1 s) has withdrawn the instance, before the
    // connection's idle timeout (5 s) would close it.
    paused_until(
        &m.agents[..1],
        Duration::from_secs(5),
        "the paused agent's instance to expire",
        || async { web_up_in(&dir_admin).await == 0 },
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(5),
        "the agent to register again",
        || async { web_up_in(&dir_admin).await == 1 },
    )
    .await
    .unwrap();
    assert_eq!(
        handshakes().await,
        before,
        "the agent registered again over its open connection, with no new handshake"
    );
    sidecar_serves_web(&m, 1, Duration::from_secs(5)).await;
}

/// 3b. Self-preservation: 3 of 5 agents paused at once (60% silent, above the directory's
///     30%) are not withdrawn when their TTLs lapse, but held; resumed, they carry on with
///     nothing withdrawn. One agent paused alone (20%) is withdrawn at its TTL, as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_falling_silent_at_once_is_held_and_one_dead_host_is_withdrawn() {
    let toml = "self_preservation = 30\nself_preservation_min_instances = 5\n";
    let m = mesh_configured(5, Some(toml)).await;
    let dir_admin = m.mesh.directory.admin();
    let metric = |name: &'static str| {
        let admin = dir_admin.clone();
        async move { admin_metric(&admin, name).await.unwrap() }
    };
    let seen_while_held = std::cell::Cell::new((0, 0));
    // Their TTLs (3 heartbeats of 1 s) lapse within about 4 s; resumed at once after, before
    // their connections' idle timeout (5 s).
    paused_until(
        &m.agents[..3],
        Duration::from_secs(6),
        "the paused agents' instances to be held",
        || async {
            let held = metric("usher_directory_withdrawals_held").await == 3.0;
            if held {
                let routes = admin_json(&dir_admin, "/v1/routes").await.unwrap();
                seen_while_held.set((
                    instances_in(&routes, "web", "up").len(),
                    shown_held(&routes),
                ));
            }
            held
        },
    )
    .await
    .unwrap();
    assert_eq!(
        seen_while_held.get(),
        (5, 3),
        "held instances stay in the table, shown as held and silent for a TTL"
    );
    held_heard_again(&dir_admin).await;
    assert_eq!(metric("usher_directory_instances_expired_total").await, 0.0);
    assert_eq!(
        metric("usher_directory_self_preservation_holds_total").await,
        1.0
    );
    assert_eq!(web_up_in(&dir_admin).await, 5);
    sidecar_serves_web(&m, 5, Duration::from_secs(5)).await;

    // One host alone: withdrawn at its TTL.
    paused_until(
        &m.agents[4..],
        Duration::from_secs(6),
        "the paused agent's instance to expire",
        || async { web_up_in(&dir_admin).await == 4 },
    )
    .await
    .unwrap();
    assert_eq!(metric("usher_directory_instances_expired_total").await, 1.0);
    assert_eq!(
        metric("usher_directory_self_preservation_holds_total").await,
        1.0
    );
    sidecar_serves_web(&m, 5, Duration::from_secs(10)).await;
}

/// 3c. A directory paused past its agents' TTL (SIGSTOP: a starved or frozen host), but not
///     past their connections' idle timeout (5 s), loses no conversation: self-preservation
///     holds the instances, and every agent, which asked for an acknowledgement during the
///     pause (every fifth heartbeat, one a second at a 200 ms interval), keeps heartbeating
///     while it waits and gets it when the directory resumes, within its 5 s. (Agents that
///     waited 3 s, in silence, all registered again; and a directory that dropped a stream
///     silent for two TTLs, 1.2 s here, ended every conversation as it resumed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_paused_past_the_ttl_keeps_every_conversation() {
    let toml = "self_preservation = 30\nself_preservation_min_instances = 5\n";
    let m = mesh_heartbeating(5, "200ms", Some(toml)).await;
    let dir_admin = m.mesh.directory.admin();
    let metric = |name: &'static str| {
        let admin = dir_admin.clone();
        async move { admin_metric(&admin, name).await.unwrap() }
    };
    let registrations = || {
        m.agents
            .iter()
            .map(|a| a.log().matches("registered with the directory").count())
            .collect::<Vec<_>>()
    };
    let before = registrations();
    assert_eq!(before, vec![1; 5], "each agent registered once");
    let handshakes = metric("usher_directory_handshakes_completed_total").await;

    m.directory.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    m.directory.signal(Signal::SIGCONT);
    held_heard_again(&dir_admin).await;
    assert_eq!(
        metric("usher_directory_self_preservation_holds_total").await,
        1.0,
        "every TTL lapsed during the pause"
    );
    // Past every deadline of an acknowledgement asked for during the pause (5 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs: Vec<String> = m.agents.iter().map(|a| a.log()).collect();
    for log in &logs {
        assert!(
            !log.contains("registering again") && !log.contains("lost the directory"),
            "no conversation ended:\n{log}"
        );
    }
    assert_eq!(registrations(), before, "no agent registered again");
    assert_eq!(
        metric("usher_directory_handshakes_completed_total").await,
        handshakes
    );
    assert_eq!(metric("usher_directory_instances_expired_total").await, 0.0);
    assert_eq!(web_up_in(&dir_admin).await, 5);
    sidecar_serves_web(&m, 5, Duration::from_secs(5)).await;
}

/// Waits (5 s at most) until the directory at admin port `admin` holds no withdrawal: every
/// instance self-preservation held was heard from again.
async fn held_heard_again(admin: &str) {
    wait_until(
        Duration::from_secs(5),
        "the held instances to be heard from again",
        || async {
            admin_metric(admin, "usher_directory_withdrawals_held")
                .await
                .unwrap()
                == 0.0
        },
    )
    .await
    .unwrap();
}

/// Instances a directory's `GET /v1/routes` shows held by self-preservation, each last heard
/// from at least a TTL (3 s) ago.
fn shown_held(routes: &serde_json::Value) -> usize {
    usher_tests::instances(routes)
        .iter()
        .filter(|i| {
            i["withdrawal_held"] == true
                && i["last_heartbeat_ms_ago"]
                    .as_u64()
                    .is_some_and(|ms| ms >= 3_000)
        })
        .count()
}

/// Instances of `web` up in the table at admin port `admin` (0 while it does not answer).
async fn web_up_in(admin: &str) -> usize {
    admin_json(admin, "/v1/routes")
        .await
        .map(|r| instances_in(&r, "web", "up").len())
        .unwrap_or(0)
}

/// Pauses `agents` (SIGSTOP: a hung host) until `condition` holds or `within` passes, then
/// resumes them (SIGCONT) either way; the wait's result.
async fn paused_until<F, Fut>(
    agents: &[Process],
    within: Duration,
    what: &str,
    condition: F,
) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for agent in agents {
        agent.signal(Signal::SIGSTOP);
    }
    let waited = wait_until(within, what, condition).await;
    for agent in agents {
        agent.signal(Signal::SIGCONT);
    }
    waited
}

/// Waits up to `within` for the sidecar's table to hold `n` instances of `web` up, then a
/// request through it must be answered.
async fn sidecar_serves_web(m: &Running, n: usize, within: Duration) {
    wait_for_up(&m.sidecar_addrs.admin(), "web", n, within)
        .await
        .unwrap();
    let r = http::get(&m.sidecar_addrs.proxy(), "web", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// Waits until the `n` agents of `web` are up in the restarted directory's table and the
/// sidecar follows that directory (connected, a table from it, an epoch other than
/// `old_epoch`).
async fn rejoined(m: &Running, n: usize, old_epoch: &serde_json::Value) {
    let dir_admin = m.mesh.directory.admin();
    wait_until(
        Duration::from_secs(15),
        "agents to rejoin the restarted directory",
        || async { web_up_in(&dir_admin).await == n },
    )
    .await
    .unwrap();
    let admin = m.sidecar_addrs.admin();
    wait_until(
        Duration::from_secs(20),
        "the sidecar to follow the new directory",
        || async {
            admin_json(&admin, "/v1/routes")
                .await
                .map(|r| {
                    r["connected"] == true && r["source"] == "directory" && r["epoch"] != *old_epoch
                })
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
}

/// 4. SIGKILL of the directory fails no request; a restarted directory is rejoined by agents
///    and sidecars, and no instance is withdrawn meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_restart_fails_no_request_and_withdraws_nothing() {
    let mut m = mesh_with(3).await;
    let admin = m.sidecar_addrs.admin();
    let before = admin_json(&admin, "/v1/routes").await.unwrap();
    let load = Load::start(
        &m.sidecar_addrs.proxy(),
        "web",
        2,
        Duration::from_millis(10),
    );

    // Watch the sidecar's table the whole time: every instance must stay up.
    let watch_admin = admin.clone();
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still = watching.clone();
    let watcher = tokio::spawn(async move {
        let mut worst = usize::MAX;
        while still.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(r) = admin_json(&watch_admin, "/v1/routes").await {
                worst = worst.min(instances_in(&r, "web", "up").len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worst
    });

    m.directory.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http::get(&m.sidecar_addrs.proxy(), "web", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "serves while the directory is down");
    m.directory = m.mesh.start_directory("directory-restarted").await.unwrap();

    // Agents re-register with the new directory and the sidecar resubscribes to it.
    rejoined(&m, 3, &before["epoch"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let worst = watcher.await.unwrap();
    let report = load.finish().await;
    assert_eq!(
        worst, 3,
        "an instance was withdrawn from the sidecar during the restart"
    );
    assert!(
        report.failures.is_empty(),
        "failed requests: {:?}",
        report.failures
    );
    assert_eq!(report.instances.len(), 3);
    let after = admin_json(&admin, "/v1/routes").await.unwrap();
    assert_eq!(
        instances_in(&after, "web", "up"),
        instances_in(&before, "web", "up")
    );
}

/// 4b. A directory that crashed and started again answers the packets of its previous
///     process's connections with a stateless reset: agents and the sidecar reconnect because
///     the directory told them, not after their own timeouts (3 s and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_directory_resets_the_connections_of_the_crashed_one() {
    let mut m = mesh_with(2).await;
    let admin = m.sidecar_addrs.admin();
    let old_epoch = admin_json(&admin, "/v1/routes").await.unwrap()["epoch"].clone();
    m.directory.kill();
    m.directory = m.mesh.start_directory("directory-restarted").await.unwrap();
    rejoined(&m, 2, &old_epoch).await;
    for node in m.agents.iter().chain([&m.sidecar]) {
        let log = node.log();
        let lost = log
            .lines()
            .find(|l| l.contains("lost the directory"))
            .unwrap_or_else(|| panic!("the node noticed the restart:\n{log}"));
        assert!(
            lost.contains("reset by peer"),
            "the node learnt of the restart from a stateless reset: {lost}"
        );
    }
}

/// 5. A sidecar restarted while the directory is down serves from its persisted table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_restarted_without_directory_serves_from_disk() {
    let mut m = mesh_with(3).await;
    m.directory.kill();
    m.sidecar.signal(Signal::SIGTERM);
    let code = tokio::task::block_in_place(|| m.sidecar.wait_exit(Duration::from_secs(15)));
    assert_eq!(code, Some(0), "sidecar exits cleanly on SIGTERM");
    let sidecar = m
        .mesh
        .start_sidecar("sidecar-restarted", &m.sidecar_addrs)
        .await
        .unwrap();
    let routes = admin_json(&m.sidecar_addrs.admin(), "/v1/routes")
        .await
        .unwrap();
    assert_eq!(routes["source"], "disk");
    assert_eq!(routes["connected"], false);
    assert_eq!(instances_in(&routes, "web", "up").len(), 3);
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let r = http::get(&m.sidecar_addrs.proxy(), "web", "/")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        seen.extend(r.instance());
    }
    assert_eq!(seen.len(), 3);
    drop(sidecar);
}

/// 6. Unknown service gives 404; a client that closes mid-response leaks no slot; the
///    directory sees the request in flight through the sidecar's load report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_404_and_abandoned_response_leaks_no_slot() {
    let m = mesh_with(1).await;
    let proxy = m.sidecar_addrs.proxy();
    let r = http::get(&proxy, "nope", "/").await.unwrap();
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("nope"),
        "body says which service: {}",
        r.text()
    );
    let r = http::get(&proxy, "Bad_Host!", "/").await.unwrap();
    assert!(r.status == 400 || r.status == 404, "bad host: {}", r.status);

    let admin = m.sidecar_addrs.admin();
    // Start a long streaming response, read its first bytes, then hang up.
    let stream = held_streaming_request(&proxy).await;
    let routes = admin_json(&admin, "/v1/routes").await.unwrap();
    assert_eq!(in_flight(&routes), 1, "the streaming request holds a slot");
    directory_sees_in_flight(&m, 1).await;
    drop(stream);
    slots_released(&m).await;
    // The slot is usable again: with concurrency 1, a leak would make this wait and 503.
    let r = http::get(&proxy, "web", "/").await.unwrap();
    assert_eq!(r.status, 200);
}

/// 6a. The sidecar reports its load to the directory every second while it has requests in
///     flight, once more (empty) when they end, and nothing while it is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_reported_while_requests_are_in_flight_and_not_while_idle() {
    let m = mesh_with(1).await;
    let dir_admin = m.mesh.directory.admin();
    let reports = || async {
        admin_metric(&dir_admin, "usher_directory_load_reports_total")
            .await
            .unwrap()
    };
    // No report for over two periods.
    let no_reports = |why: &'static str| async move {
        let before = reports().await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(reports().await, before, "{why}");
    };
    // Idle (past any report the setup's requests caused).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    no_reports("an idle sidecar sends no load reports").await;

    // A request in flight for 10 s: a report every second.
    let stream = held_streaming_request(&m.sidecar_addrs.proxy()).await;
    directory_sees_in_flight(&m, 1).await;
    let busy = reports().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = reports().await;
    assert!(
        later >= busy + 2.0,
        "a busy sidecar reports every second: {busy} then {later} after 2.5 s"
    );

    // The request ends: an empty report within a period clears it (the unit test of
    // `LoadReporting` pins that one down), then nothing.
    drop(stream);
    slots_released(&m).await;
    directory_sees_in_flight(&m, 0).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    no_reports("no report after the one that cleared the load").await;
}

/// A request to `web` through the sidecar at `proxy` for a 10 s streaming body, its response
/// head read: the connection holds one slot until it is dropped.
async fn held_streaming_request(proxy: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(b"GET /stream?chunks=200&ms=50 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stream
}

/// The sidecar's reserved slots over its instances, from its `GET /v1/routes`.
fn in_flight(routes: &serde_json::Value) -> u64 {
    routes["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["in_flight"].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until the directory's `web` has `n` requests in flight: the sidecar reports them (the
/// autoscaler's signal) within a report period.
async fn directory_sees_in_flight(m: &Running, n: u64) {
    let dir_admin = m.mesh.directory.admin();
    wait_until(
        Duration::from_secs(3),
        &format!("the directory to see {n} requests in flight"),
        || async {
            admin_json(&dir_admin, "/v1/services")
                .await
                .map(|doc| {
                    doc["services"][0]["service"] == "web" && doc["services"][0]["in_flight"] == n
                })
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
}

/// Waits until the sidecar holds no reservation.
async fn slots_released(m: &Running) {
    let admin = m.sidecar_addrs.admin();
    wait_until(
        Duration::from_secs(5),
        "the slot to be released",
        || async { in_flight(&admin_json(&admin, "/v1/routes").await.unwrap()) == 0 },
    )
    .await
    .unwrap();
}

/// 6b. A WebSocket crosses the mesh: the sidecar tunnels it to an instance after its `101`,
///     holds a slot of that instance while it is open (the directory sees a request in
///     flight), and releases it when the socket closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_crosses_the_mesh_as_a_request_in_flight() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let m = mesh_with(2).await;
    let tcp = tokio::net::TcpStream::connect(m.sidecar_addrs.proxy())
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://web/ws", tcp)
        .await
        .expect("the WebSocket handshake through the sidecar");
    assert_eq!(response.status(), 101);
    let mut answered_by = BTreeSet::new();
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer in time")
            .expect("the socket is open")
            .unwrap();
        let reply = reply.into_text().unwrap().to_string();
        let (instance, text) = reply.split_once(": ").expect("NAME: text");
        assert_eq!(text, format!("hello {i}"));
        answered_by.insert(instance.to_string());
    }
    assert_eq!(
        answered_by.len(),
        1,
        "one socket, one instance: {answered_by:?}"
    );

    let routes = admin_json(&m.sidecar_addrs.admin(), "/v1/routes")
        .await
        .unwrap();
    assert_eq!(in_flight(&routes), 1, "the open socket holds a slot");
    directory_sees_in_flight(&m, 1).await;
    let metrics = admin_metrics(&m.sidecar_addrs.admin()).await.unwrap();
    assert_eq!(sample(&metrics, "usher_sidecar_tunnels"), Some(1.0));

    ws.close(None).await.unwrap();
    drop(ws);
    slots_released(&m).await;
    directory_sees_in_flight(&m, 0).await;
}

/// 6c. gRPC's transport crosses the mesh: an HTTP/2 client (prior knowledge, no TLS) sends
///     streams on one connection to the sidecar; each is routed and reserved on its own, goes
///     to an instance over h2c, and comes back with its body and trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_cross_the_mesh_with_their_trailers() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    let m = mesh_with(2).await;
    let tcp = tokio::net::TcpStream::connect(m.sidecar_addrs.proxy())
        .await
        .unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let calls = (0..16).map(|i| {
        let mut sender = sender.clone();
        async move {
            let message = Bytes::from(format!("call {i}"));
            let request = ::http::Request::post("http://web/grpc")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(message.clone()))
                .unwrap();
            let response =
                tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
                    .await
                    .expect("an answer in time")
                    .expect("an answer");
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap();
            let trailers = body.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(body.to_bytes(), message);
            trailers["x-instance"].to_str().unwrap().to_string()
        }
    });
    let answered_by: BTreeSet<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect();
    let all: BTreeSet<String> = ["web-1", "web-2"].map(String::from).into();
    assert_eq!(
        answered_by, all,
        "the streams of one connection spread over instances"
    );
    slots_released(&m).await;
}

/// 7. Garbage and oversized frames sent to the directory's port are refused; it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_are_refused_and_the_directory_keeps_serving() {
    let m = mesh_with(1).await;
    let quic = m.mesh.directory.quic();

    // Raw UDP garbage at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i * 31 + j * 7) as u8).collect();
        udp.send_to(&junk, &quic).unwrap();
    }

    // A sidecar's credentials, stored by the real sidecar in its state directory.
    let node_tls = usher_shared::enrolment::NodeTls {
        identity: usher_shared::identity::NodeIdentity::Sidecar,
        ca: None,
        cert: None,
        join_token: None,
        join_address: m.mesh.directory.join(),
        state_dir: m.sidecar_addrs.state_dir.clone(),
    };
    let creds = usher_shared::enrolment::obtain(&node_tls).await.unwrap();
    let endpoint =
        usher_shared::session::node_endpoint(&creds, usher_shared::quic::Liveness::KeepAlive)
            .unwrap();
    let conn = endpoint
        .connect(quic.parse().unwrap(), usher_shared::quic::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let hostile: Vec<Vec<u8>> = vec![
        // Garbage payload in a well-formed frame.
        [&8u32.to_be_bytes()[..], &[0xc1; 8]].concat(),
        // A header announcing 4 GiB.
        u32::MAX.to_be_bytes().to_vec(),
        // Just above the node frame limit.
        ((usher_shared::codec::MAX_NODE_FRAME as u32) + 1)
            .to_be_bytes()
            .to_vec(),
        // Random bytes.
        (0..500u32).map(|i| (i * 131 % 251) as u8).collect(),
    ];
    for bytes in hostile {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        // The directory answers with an error frame and/or closes the stream, quickly.
        let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(64 * 1024)).await;
        let Ok(reply) = read else {
            panic!("directory neither answered nor closed the stream");
        };
        // A reset stream is a refusal too; an answer must be an error frame.
        let reply = reply.unwrap_or_default();
        if reply.len() > 4 {
            let mut buf = bytes::BytesMut::from(&reply[..]);
            let msg: Option<usher_shared::protocol::DirectoryMessage> =
                usher_shared::codec::decode_frame(
                    &mut buf,
                    usher_shared::codec::MAX_DIRECTORY_FRAME,
                )
                .unwrap();
            assert!(
                matches!(
                    msg,
                    Some(usher_shared::protocol::DirectoryMessage::Error { .. })
                ),
                "expected an error frame, got {msg:?}"
            );
        }
    }
    conn.close(0u32.into(), b"done");

    // Still serving: health, the admin API, routes, and a new instance joins.
    let r = http::get(&m.mesh.directory.admin(), "localhost", "/healthz")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let _second = m.mesh.start_agent("web-2", "web", &[]).unwrap();
    sidecar_serves_web(&m, 2, Duration::from_secs(15)).await;
    let _ = m.directory.pid();
}
