//! gRPC through the mesh with gRPC's own implementation at both ends (grpcio, gRPC's C core,
//! from Python: `tests/python/grpc_echo.py`): two real gRPC servers as the instances of `echo`, run
//! and registered by real agents, and a real gRPC client that talks to the real sidecar over
//! one insecure channel whose authority is the service. The agents check their servers with
//! gRPC's health service (`--health grpc:SERVICE`). Needs `python3-grpcio` (`.ci/run`
//! installs it); skipped with a note without it unless `USHER_TESTS_REQUIRE_TOOLS` is set.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use usher_tests::{python_with_grpc, wait_for_up, Mesh, Process};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_cross_the_mesh_between_real_grpc_clients_and_servers() {
    let Some(python) = python_with_grpc() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_echo.py");
    let mesh = Mesh::new().unwrap();
    let _directory = mesh.start_directory("directory").await.unwrap();
    let credentials = mesh.join_flags("agent", Some("echo")).unwrap();
    // While this file exists, echo-2's server reports NOT_SERVING.
    let down = mesh.dir().join("echo-2.down");
    let _agents: Vec<Process> = ["echo-1", "echo-2"]
        .into_iter()
        .map(|name| {
            let server = [
                python.display().to_string(),
                script.display().to_string(),
                "serve".into(),
                "--port".into(),
                "{port}".into(),
                "--name".into(),
                name.into(),
                "--not-serving-if".into(),
                mesh.dir()
                    .join(format!("{name}.down"))
                    .display()
                    .to_string(),
            ];
            let health = "grpc:usher.test.Echo";
            mesh.start_agent_running(name, "echo", &credentials, &["--id", name], health, &server)
                .unwrap()
        })
        .collect();
    let addrs = mesh.sidecar_addrs("client");
    let _sidecar = mesh.start_sidecar("sidecar", &addrs).await.unwrap();
    wait_for_up(&addrs.admin(), "echo", 2, Duration::from_secs(30))
        .await
        .unwrap();

    let result = call(&python, &script, &addrs.proxy()).await;

    // 20 concurrent unary calls on one channel (one HTTP/2 connection): each answered, and
    // spread over both servers, whose trailing metadata came back.
    let unary = result["unary"].as_array().unwrap();
    assert_eq!(unary.len(), 20, "{result}");
    for (i, answer) in unary.iter().enumerate() {
        let answer = answer.as_str().unwrap();
        assert!(answer.ends_with(&format!(": hello {i}")), "{answer}");
    }
    assert_eq!(
        result["instances"],
        serde_json::json!(["echo-1", "echo-2"]),
        "{result}"
    );
    // A bidirectional stream, answered message by message by one server.
    let streamed: Vec<&str> = result["stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(streamed.len(), 3, "{result}");
    let server = streamed[0].split(':').next().unwrap();
    assert_eq!(
        streamed,
        ["a", "b", "c"].map(|m| format!("{server}: {m}")),
        "{result}"
    );
    // The server's own status and message pass through; the sidecar's refusal of an unknown
    // service comes as gRPC's UNIMPLEMENTED, with the sidecar's reason.
    assert_eq!(
        result["fail"],
        serde_json::json!(["FAILED_PRECONDITION", "asked to fail"])
    );
    assert_eq!(
        result["unknown"],
        serde_json::json!(["UNIMPLEMENTED", "unknown service \"nope\""]),
        "{result}"
    );

    // echo-2 reports NOT_SERVING: its agent takes it out of the table, and every call goes
    // to echo-1; once it serves again, it is back.
    std::fs::write(&down, b"").unwrap();
    wait_for_up(&addrs.admin(), "echo", 1, Duration::from_secs(10))
        .await
        .unwrap();
    let result = call(&python, &script, &addrs.proxy()).await;
    assert_eq!(
        result["instances"],
        serde_json::json!(["echo-1"]),
        "{result}"
    );
    assert_eq!(result["unary"].as_array().unwrap().len(), 20, "{result}");
    std::fs::remove_file(&down).unwrap();
    wait_for_up(&addrs.admin(), "echo", 2, Duration::from_secs(10))
        .await
        .unwrap();
}

/// Runs the gRPC client (`grpc_echo.py call`) against the sidecar at `proxy`; what it printed.
async fn call(python: &Path, script: &Path, proxy: &str) -> Value {
    let called = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python)
            .arg(script)
            .args(["call", "--target", proxy, "--authority", "echo"])
            .args(["--calls", "20"])
            .output(),
    )
    .await
    .expect("the gRPC client finishes within 60 s")
    .unwrap();
    let stderr = String::from_utf8_lossy(&called.stderr);
    assert!(called.status.success(), "the gRPC client failed: {stderr}");
    serde_json::from_slice(&called.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&called.stdout)))
}
