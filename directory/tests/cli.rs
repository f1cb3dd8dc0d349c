//! The binary refuses bad configuration with a message that names the flag.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_usher-directory"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let (code, err) = run(&["--heartbeat-interval", "1ms"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--heartbeat-interval"), "{err}");
    let (code, err) = run(&["--listen", "not-an-address"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--listen"), "{err}");
    let (code, err) = run(&["--config", "/nonexistent/usher.toml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/usher.toml"), "{err}");
}

#[test]
fn an_unusable_state_dir_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let state = file.join("state");
    let (code, err) = run(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("state directory"), "{err}");
}
