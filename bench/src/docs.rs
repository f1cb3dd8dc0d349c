//! Where a benchmark's figures go: between its markers in `docs/BENCHMARKS.md`.

use anyhow::{Context, Result};

/// The file the figures are written to: `$BENCH_DOCS` (CI points it at a scratch file so its
/// smoke-size figures go nowhere), else `docs/BENCHMARKS.md`.
pub fn path() -> String {
    std::env::var("BENCH_DOCS").unwrap_or_else(|_| "docs/BENCHMARKS.md".into())
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path` (appends
/// the section if missing).
pub fn write_section(path: &str, name: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let section = format!("{begin}\n{body}{end}");
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{section}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(path, updated).with_context(|| format!("cannot write {path}"))
}

/// The current UTC date and time, as `date -u` prints it.
pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default()
        .trim()
        .to_string()
}
