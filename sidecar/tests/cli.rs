//! The binary refuses bad flags with a message that names the flag or file.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_usher-sidecar"))
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
    let base = [
        "--directory",
        "127.0.0.1:7400",
        "--ca",
        "/nonexistent/ca.pem",
    ];
    for (extra, named) in [
        (&["--queue-timeout", "0s"][..], "--queue-timeout"),
        (&["--max-queued", "none"][..], "--max-queued"),
        (&["--listen", "everywhere"][..], "--listen"),
        (&["--threads", "0"][..], "--threads"),
        (&["--threads", "two"][..], "--threads"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(named), "{args:?} should name {named}: {err}");
    }
    let (code, err) = run(&["--directory", "no-port", "--ca", "x"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--directory"), "{err}");
}

#[test]
fn threads_from_the_environment_are_checked_too() {
    let out = Command::new(env!("CARGO_BIN_EXE_usher-sidecar"))
        .args(["--directory", "127.0.0.1:7400", "--ca", "x"])
        .env("USHER_SIDECAR_THREADS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--threads 0: must be between 1 and"), "{err}");
}

/// Startup errors about the certificate exit 1 and say which file is missing, or what to pass.
#[test]
fn certificate_errors_name_the_file_or_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let operator = [
        "--ca",
        "/nonexistent/ca.pem",
        "--cert",
        "/nonexistent/node.pem",
        "--key",
        "/nonexistent/node-key.pem",
    ];
    for (extra, said) in [
        (&operator[..], "/nonexistent/ca.pem"),
        (&[][..], "--join-token"),
    ] {
        let mut args = vec![
            "--directory",
            "127.0.0.1:7400",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ];
        args.extend(extra);
        let (code, err) = run(&args);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(said), "{err}");
    }
}
