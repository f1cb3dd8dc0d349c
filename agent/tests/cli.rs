//! The binary refuses bad flags with a message that names the flag, before touching anything.

use std::process::Command;

fn run(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_usher-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BASE: [&str; 6] = [
    "--directory",
    "127.0.0.1:7400",
    "--ca",
    "/nonexistent/ca.pem",
    "--address",
    "127.0.0.1:8080",
];

/// The required flags (with a CA that does not exist) plus `extra`.
fn with(extra: &[&str]) -> Vec<String> {
    BASE.iter().chain(extra).map(|s| s.to_string()).collect()
}

#[test]
fn bad_names_and_values_exit_2_naming_the_flag() {
    for (flags, named) in [
        (with(&["--service", "Web_1"]), "--service"),
        (
            with(&["--service", "web", "--version", "v1.2"]),
            "--version",
        ),
        (with(&["--service", "web", "--health", "udp"]), "--health"),
        (
            with(&["--service", "web", "--concurrency", "0"]),
            "--concurrency",
        ),
        (
            with(&["--service", "web", "--health-interval", "soon"]),
            "--health-interval",
        ),
    ] {
        let (code, err) = run(&flags);
        assert_eq!(code, Some(2), "{flags:?}: {err}");
        assert!(err.contains(named), "{flags:?} should name {named}: {err}");
    }
}

/// Startup errors about the certificate exit 1 and say which file is missing, or what to pass.
#[test]
fn certificate_errors_name_the_file_or_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let operator = [
        "--cert",
        "/nonexistent/node.pem",
        "--key",
        "/nonexistent/node-key.pem",
    ];
    for (extra, said) in [
        (&operator[..], "/nonexistent/ca.pem"),
        (&[][..], "--join-token"),
    ] {
        let mut flags = vec![
            "--service",
            "web",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
        ];
        flags.extend(extra);
        let (code, err) = run(&with(&flags));
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(said), "{err}");
    }
}
