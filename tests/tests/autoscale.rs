//! End-to-end tests of autoscaling: the real directory scales a `[[services]]` entry through
//! its `process` scheduler (real `usher-agent`s supervising real `usher-test-server`s), driven
//! by the load a real sidecar reports.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use usher_shared::metrics::sample;
use usher_tests::{
    admin_json, admin_metrics, bin, http, scaled_version, wait_until, Load, Mesh, Process,
};

/// The `hello` service at zero: concurrency 1, at most 3 instances, quick to idle and to step
/// down so the tests are short.
fn services() -> String {
    service("hello")
}

fn service(name: &str) -> String {
    scaled_version(name, "v1", 0)
}

struct Scaled {
    mesh: Mesh,
    directory: Process,
    _sidecar: Process,
    proxy: String,
}

async fn start() -> Scaled {
    start_with(&services()).await
}

async fn start_with(config: &str) -> Scaled {
    let mesh = Mesh::new().unwrap();
    let directory = mesh
        .start_directory_with_config("directory", config)
        .await
        .unwrap();
    let addrs = mesh.sidecar_addrs("a");
    let sidecar = mesh.start_sidecar("sidecar", &addrs).await.unwrap();
    // The sidecar knows the declared service before any instance exists.
    let admin = addrs.admin();
    wait_until(
        Duration::from_secs(10),
        "the sidecar to hold the table",
        || async {
            admin_json(&admin, "/v1/routes")
                .await
                .map(|r| r["source"] == "directory")
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
    Scaled {
        proxy: addrs.proxy(),
        mesh,
        directory,
        _sidecar: sidecar,
    }
}

/// The `scaling` object of `hello/v1` in the directory's `/v1/services`.
async fn scaling(mesh: &Mesh) -> serde_json::Value {
    scaling_of(mesh, "hello").await
}

/// The `scaling` object of `service/v1` (`null` when the directory does not manage it).
async fn scaling_of(mesh: &Mesh, service: &str) -> serde_json::Value {
    scaling_of_version(mesh, service, "v1").await
}

async fn scaling_of_version(mesh: &Mesh, service: &str, version: &str) -> serde_json::Value {
    let doc = admin_json(&mesh.directory.admin(), "/v1/services")
        .await
        .unwrap();
    doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service && s["version"] == version)
        .map(|s| s["scaling"].clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_serves_the_first_request_and_idle_scales_to_zero() {
    let s = start().await;
    assert_eq!(scaling(&s.mesh).await["target"], 0, "starts at zero");
    let started = Instant::now();
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.instance().as_deref(), Some("hello"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cold start took {:?}",
        started.elapsed()
    );
    let status = scaling(&s.mesh).await;
    assert_eq!(status["target"], 1);
    assert_eq!(status["decisions"][0]["reasons"][0]["reason"], "cold_start");

    // Idle for the idle timeout (3 s): back to zero, and the instance is gone.
    let mesh = &s.mesh;
    wait_until(Duration::from_secs(15), "scale to zero", || async {
        let status = scaling(mesh).await;
        status["target"] == 0 && status["started"] == 0
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the instance to leave the table",
        || async {
            admin_json(&mesh.directory.admin(), "/v1/routes")
                .await
                .map(|r| r["instances"].as_array().is_some_and(|a| a.is_empty()))
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
    // The directory's metrics count the two target changes.
    let metrics = admin_metrics(&mesh.directory.admin()).await.unwrap();
    let hello = r#"{service="hello",version="v1"}"#;
    for (name, value) in [
        ("usher_directory_scale_ups_total", 1.0),
        ("usher_directory_scale_downs_total", 1.0),
        ("usher_directory_scheduler_errors_total", 0.0),
        ("usher_directory_target_instances", 0.0),
    ] {
        let series = format!("{name}{hello}");
        assert_eq!(
            sample(&metrics, &series),
            Some(value),
            "{series} in\n{metrics}"
        );
    }
    // And it starts again on demand.
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

/// After a directory restart, a request for a version at zero is served as soon as its new
/// instance is up, not when the grace period ends: the sidecar, which holds the previous
/// run's table, gets the instances that register meanwhile (`GraceUpserts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_right_after_a_directory_restart_does_not_wait_for_the_grace_period() {
    // A grace period far longer than a cold start.
    let grace = Duration::from_secs(20);
    let config = format!("grace_period = \"20s\"\n{}", services());
    let mut s = start_with(&config).await;
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // A clean restart: the directory stops its instance and exits; the new run starts with
    // `hello` at zero and the sidecar still holds the old run's table.
    s.directory.signal(Signal::SIGTERM);
    let code = tokio::task::block_in_place(|| s.directory.wait_exit(Duration::from_secs(20)));
    assert_eq!(code, Some(0));
    s.directory = s
        .mesh
        .start_directory_with_config("directory-restarted", &config)
        .await
        .unwrap();
    let restarted = Instant::now();
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.instance().as_deref(), Some("hello"));
    let waited = restarted.elapsed();
    assert!(
        waited < grace / 2,
        "the cold start waited {waited:?}, as if for the grace period ({grace:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_to_max_and_scaling_down_under_load_fails_nothing() {
    let mut s = start().await;
    // Six concurrent slow requests, one slot per instance, at most three instances.
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let proxy = s.proxy.clone();
            tokio::spawn(async move { http::get(&proxy, "hello", "/slow?ms=2000").await })
        })
        .collect();
    let mesh = &s.mesh;
    wait_until(Duration::from_secs(10), "three instances", || async {
        scaling(mesh).await["started"] == 3
    })
    .await
    .unwrap();
    for request in burst {
        let r = request.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        scaling(mesh).await["target"],
        3,
        "never above max_instances"
    );

    // One client keeps sending while the target falls from 3: no request fails.
    let load = Load::start(&s.proxy, "hello", 1, Duration::from_millis(20));
    wait_until(
        Duration::from_secs(20),
        "the target to fall to one",
        || async {
            let status = scaling(mesh).await;
            status["target"] == 1 && status["started"] == 1
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    assert!(
        report.failures.is_empty(),
        "failed while scaling down: {:?}",
        report.failures
    );
    assert!(report.ok > 50, "load ran: {}", report.ok);

    // A clean directory shutdown leaves no instance behind.
    let children = usher_tests::descendants(s.directory.pid());
    assert!(!children.is_empty(), "the directory supervises its agents");
    s.directory.signal(Signal::SIGTERM);
    let code = tokio::task::block_in_place(|| s.directory.wait_exit(Duration::from_secs(20)));
    assert_eq!(code, Some(0));
    for pid in children {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "process {pid} outlived the directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_services() {
    let s = start().await;
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    // A bad file is refused and changes nothing.
    let config = s.mesh.dir().join("directory.toml");
    std::fs::write(&config, "[[services]]\nname = \"Bad Name\"\n").unwrap();
    s.directory.signal(Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(scaling(&s.mesh).await["target"], 1, "still managed");

    // hello is replaced by hi: hello's instance drains away, hi starts on demand.
    std::fs::write(&config, service("hi")).unwrap();
    s.directory.signal(Signal::SIGHUP);
    let mesh = &s.mesh;
    wait_until(
        Duration::from_secs(20),
        "hi managed and hello gone",
        || async {
            scaling_of(mesh, "hi").await.is_object() && !scaling_of(mesh, "hello").await.is_object()
        },
    )
    .await
    .unwrap();
    // The sidecar learns of hi with the next batch; the first request cold-starts it.
    let proxy = s.proxy.clone();
    wait_until(
        Duration::from_secs(10),
        "hi to serve through the sidecar",
        || async {
            http::get(&proxy, "hi", "/")
                .await
                .map(|r| r.status == 200 && r.instance().as_deref() == Some("hi"))
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "hello to be unknown to the sidecar",
        || async {
            http::get(&proxy, "hello", "/")
                .await
                .map(|r| r.status == 404)
                .unwrap_or(false)
        },
    )
    .await
    .unwrap();
    assert!(s
        .directory
        .log()
        .contains("SIGHUP: the configuration is refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pins_and_releases_a_target() {
    let s = start().await;
    let admin = s.mesh.directory.admin();
    // With a wrong admin token the directory refuses the mutation.
    let wrong = s.mesh.dir().join("wrong-admin-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let out = std::process::Command::new(bin("usher-directory"))
        .args([
            "scale",
            "hello",
            "2",
            "--admin",
            &admin,
            "--admin-token-file",
        ])
        .arg(&wrong)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Bearer"), "{err}");
    let scale = |target: &str, instances: &str| {
        let out = s.mesh.directory_cli(&["scale", target, instances]).unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = scale("hello", "2");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hello/v1 pinned at 2"), "{out}");
    let mesh = &s.mesh;
    wait_until(
        Duration::from_secs(15),
        "two pinned instances with no load",
        || async {
            let status = scaling(mesh).await;
            status["pinned"] == 2 && status["started"] == 2
        },
    )
    .await
    .unwrap();
    assert_eq!(
        scaling(mesh).await["decisions"][0]["reasons"][0]["reason"],
        "pinned"
    );

    let (code, _, err) = scale("nope", "1");
    assert_eq!(code, Some(1));
    assert!(err.contains("not a service the directory scales"), "{err}");
    let (code, _, err) = scale("hello", "many");
    assert_eq!(code, Some(2));
    assert!(err.contains("many"), "{err}");

    let (code, out, err) = scale("hello.v1", "release");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("autoscaler"), "{out}");
    // Released with no load: back to zero after the idle timeout.
    wait_until(
        Duration::from_secs(20),
        "scale to zero after release",
        || async {
            let status = scaling(mesh).await;
            status["pinned"].is_null() && status["target"] == 0
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_old_version_goes_to_zero_and_its_routes_are_withdrawn() {
    // hello/v1 is kept at one instance by min_instances...
    let s = start_with(&scaled_version("hello", "v1", 1)).await;
    let mesh = &s.mesh;
    wait_until(Duration::from_secs(15), "v1's minimum instance", || async {
        let r = admin_json(&mesh.directory.admin(), "/v1/routes").await;
        r.is_ok_and(|r| usher_tests::instances_in(&r, "hello", "up").len() == 1)
    })
    .await
    .unwrap();
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.instance().as_deref(), Some("hello"), "v1 serves");

    // ...until v2 arrives: v2 keeps its minimum, v1 idles to zero and leaves the table.
    let config = s.mesh.dir().join("directory.toml");
    let both = format!(
        "{}{}",
        scaled_version("hello", "v1", 1),
        scaled_version("hello", "v2", 1)
    );
    std::fs::write(&config, both).unwrap();
    s.directory.signal(Signal::SIGHUP);
    wait_until(
        Duration::from_secs(25),
        "v1 at zero and out of the table, v2 up",
        || async {
            let v1 = scaling_of_version(mesh, "hello", "v1").await;
            let Ok(routes) = admin_json(&mesh.directory.admin(), "/v1/routes").await else {
                return false;
            };
            let versions: Vec<_> = routes["instances"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| {
                    (
                        i["version"].as_str().unwrap().to_string(),
                        i["state"].clone(),
                    )
                })
                .collect();
            v1["target"] == 0
                && v1["started"] == 0
                && versions.len() == 1
                && versions[0] == ("v2".to_string(), serde_json::json!("up"))
        },
    )
    .await
    .unwrap();
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.instance().as_deref(), Some("hello-v2"), "{}", r.text());
    // v1 stays addressable: a request naming it starts it again.
    let r = http::get(&s.proxy, "v1.hello", "/").await.unwrap();
    assert_eq!(r.instance().as_deref(), Some("hello"), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_replaced() {
    let s = start_with(&scaled_version("hello", "v1", 1)).await;
    let admin = s.mesh.directory.admin();
    let up = || async {
        admin_json(&admin, "/v1/routes")
            .await
            .map(|r| usher_tests::instances_in(&r, "hello", "up"))
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(15), "the minimum instance", || async {
        up().await.len() == 1
    })
    .await
    .unwrap();
    let first = up().await;

    // SIGKILL the instance's own process (below its agent, below the directory).
    let servers: Vec<u32> = usher_tests::descendants(s.directory.pid())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split('\0')
                    .next()
                    .unwrap_or("")
                    .ends_with("usher-test-server")
            })
        })
        .collect();
    assert_eq!(servers.len(), 1, "one instance process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(servers[0] as i32),
        Signal::SIGKILL,
    )
    .unwrap();

    wait_until(
        Duration::from_secs(15),
        "a replacement instance",
        || async {
            let now = up().await;
            now.len() == 1 && now != first
        },
    )
    .await
    .unwrap();
    let r = http::get(&s.proxy, "hello", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}
