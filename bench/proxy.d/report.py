#!/usr/bin/env python3
"""Turns the raw results of bench/proxy into Markdown: prints it and writes it between the
`<!-- proxy:begin -->` and `<!-- proxy:end -->` markers of docs/BENCHMARKS.md (adding the
section at the end when the markers are absent; other sections are left as they are).

Input: results.tsv (round, load, target, CPU clock ticks as "user,system" or empty, the JSON summary
of wrk.lua, or of h2load.py for the h2c loads `h2` and `h2mux`) and
rss.tsv (process, `base` or `fleet`, VmRSS in kB). Every figure comes from these files.
"""

import argparse
import datetime
import json
import re
import statistics
import sys
from collections import defaultdict

BEGIN, END = "<!-- proxy:begin -->", "<!-- proxy:end -->"
HEADING = "## Data path: sidecar vs HAProxy vs direct"
TARGETS = ["direct", "haproxy", "usher-1t", "usher-mt"]
USHERS = ["usher-1t", "usher-mt"]
LOADS = {
    "sat": "saturation, `-t1 -c32`",
    "one": "one connection, `-t1 -c1`",
    "paced": "paced",
    "h2": "HTTP/2 (h2c), one stream per connection, `h2load -t1 -c32 -m1`",
    "h2mux": "HTTP/2 (h2c), multiplexed, `h2load -t1 -c32 -m10`",
}
H2_LOADS = ["h2", "h2mux"]
THROUGHPUT_TARGET = 1.25
ADDED_LATENCY_TARGET = 0.6
RSS_TARGET_MB = 15.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    for name in ["results", "rss", "docs", "cpu", "duration", "haproxy", "nginx", "wrk", "commit"]:
        p.add_argument("--" + name, required=True)
    p.add_argument("--instructions", help="instructions.tsv: name, requests, instructions")
    p.add_argument("--instructions-duration", default="")
    p.add_argument("--h2load", default="", help="h2load's version line")
    for name in ["nproc", "clk-tck", "rounds", "rate", "paced-conns", "paced-delay-ms", "fleet",
                 "default-threads"]:
        p.add_argument("--" + name, required=True, type=int)
    return p.parse_args()


def load_results(path):
    """{(round, load, target): {"rps", "p50", "p99", "requests", "ticks", "errors"}}"""
    runs = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            rnd, load, target, ticks, doc = line.split("\t", 4)
            s = json.loads(doc)
            seconds = s["duration_us"] / 1e6
            runs[(int(rnd), load, target)] = {
                "rps": s["requests"] / seconds if seconds > 0 else 0.0,
                "p50": s["p50_us"],
                "p99": s["p99_us"],
                "requests": s["requests"],
                "ticks": tuple(int(t) for t in ticks.split(",")) if ticks else None,
                "errors": sum(s["errors"].values()),
            }
    return runs


def load_rss(path):
    rss = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                name, when, kb = line.split()
                rss[(name, when)] = int(kb)
    return rss


def load_instructions(path):
    """{name: (requests, instructions)}; empty when the phase was skipped."""
    out = {}
    if not path:
        return out
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                out[parts[0]] = (int(parts[1]), int(parts[2]))
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0, suffix=""):
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def verdict(ok):
    if ok is None:
        return "**undetermined**"
    return "**met**" if ok else "**missed**"


def main():
    a = parse_args()
    runs = load_results(a.results)
    rss = load_rss(a.rss)
    rounds = sorted({r for (r, _, _) in runs})
    label = {
        "direct": "direct (no proxy)",
        "haproxy": "HAProxy, nbthread 1",
        "usher-1t": "usher sidecar, `--threads 1`",
        "usher-mt": f"usher sidecar, default threads ({a.default_threads})",
    }

    def per_round(load, target, key):
        return [runs[(r, load, target)][key] for r in rounds if (r, load, target) in runs]

    def ratio(load, target, base, key):
        """Median over rounds of target/base, each pair measured in the same round."""
        out = []
        for r in rounds:
            t, b = runs.get((r, load, target)), runs.get((r, load, base))
            if t and b and b[key]:
                out.append(t[key] / b[key])
        return median(out)

    def added(load, target, key):
        """Median over rounds of target minus direct, in µs."""
        out = []
        for r in rounds:
            t, d = runs.get((r, load, target)), runs.get((r, load, "direct"))
            if t and d:
                out.append(t[key] - d[key])
        return median(out)

    def cpu_us_per_request(load, target, part=None):
        """CPU µs per request: user + system, or only `part` (0 user, 1 system)."""
        ticks = [runs[(r, load, target)]["ticks"] for r in rounds if (r, load, target) in runs]
        reqs = sum(per_round(load, target, "requests"))
        if not ticks or None in ticks or not reqs:
            return None
        used = sum(sum(t) if part is None else t[part] for t in ticks)
        return used / a.clk_tck * 1e6 / reqs

    def split(load, target):
        user, system = (cpu_us_per_request(load, target, part) for part in (0, 1))
        return "–" if user is None else f"{fmt(user, 1)} / {fmt(system, 1)}"

    def throughput_table(load):
        w(f"**{LOADS[load]}**")
        w("")
        w("| target | req/s | p50 µs | p99 µs | req/s vs HAProxy | req/s vs direct "
          "| CPU µs/request | of it user / system |")
        w("|---|---|---|---|---|---|---|---|")
        for t in TARGETS:
            w(f"| {label[t]} | {fmt(median(per_round(load, t, 'rps')))} "
              f"| {fmt(median(per_round(load, t, 'p50')))} "
              f"| {fmt(median(per_round(load, t, 'p99')))} "
              f"| {fmt(ratio(load, t, 'haproxy', 'rps'), 2, '×')} "
              f"| {fmt(ratio(load, t, 'direct', 'rps'), 2, '×')} "
              f"| {fmt(cpu_us_per_request(load, t), 1)} "
              f"| {split(load, t)} |")
        w("")

    instructions = load_instructions(a.instructions)
    errors = sum(run["errors"] for run in runs.values())
    h2_errors = sum(run["errors"] for (_, load, _), run in runs.items() if load in H2_LOADS)
    has_h2 = any(load in H2_LOADS for (_, load, _) in runs)
    h2load = a.h2load.replace("h2load nghttp2/", "h2load (nghttp2 ") + ")" if a.h2load else ""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = []
    w = out.append
    w(f"Measured {date} at commit `{a.commit}` on {a.nproc} CPUs ({a.cpu}), shared with other "
      "work, so only ratios within this run mean anything. "
      f"{a.haproxy.split(' - ')[0]}, {a.nginx.replace('nginx version: ', '')}, {a.wrk}"
      f"{', ' + h2load if has_h2 and h2load else ''}. "
      f"Median of {len(rounds)} rounds of {a.duration} per load and target; the targets "
      "alternate, their order rotating each round.")
    w("")
    w("```sh")
    w(f"DURATION={a.duration} ROUNDS={a.rounds} RATE={a.rate} FLEET={a.fleet} bench/proxy")
    w("# per round, per load, per target (usher adds -H 'Host: bench'):")
    w(f"wrk -t1 -c32 -d{a.duration} --latency -s bench/proxy.d/wrk.lua http://127.0.0.1:PORT/")
    w(f"wrk -t1 -c1 -d{a.duration} --latency -s bench/proxy.d/wrk.lua http://127.0.0.1:PORT/")
    w(f"wrk -t1 -c{a.paced_conns} -d{a.duration} --latency -s bench/proxy.d/wrk.lua "
      f"http://127.0.0.1:PORT/ -- {a.paced_delay_ms}")
    if has_h2:
        w("# h2c: usher gets http://bench-h2/ with --connect-to=127.0.0.1:PORT (its :authority)")
        w(f"h2load -t1 -c32 -m1 -D {a.duration} --log-file=FILE http://127.0.0.1:PORT/")
        w(f"h2load -t1 -c32 -m10 -D {a.duration} --log-file=FILE http://127.0.0.1:PORT/")
    w("```")
    w("")
    w("Backend: nginx, `worker_processes 1`, `access_log off`, a 17-byte body. HAProxy: http "
      "mode, `nbthread 1`, `http-reuse always`. usher: one directory, one `usher-agent` "
      "registering nginx (`--concurrency 256`, so no request queues), two sidecars "
      f"(`--threads 1` and the default, {a.default_threads}). "
      + ("HTTP/2: nginx also listens for h2c (`listen … http2`, prior knowledge, no TLS; "
         "`http2_max_concurrent_streams 512`), HAProxy has a second frontend and "
         "backend with `proto h2` on both sides, and a second `usher-agent` registers that "
         "port as service `bench-h2` (`--concurrency 512`, above the 320 streams of `-m10`, so "
         "no stream queues), which both sidecars route over h2c, one multiplexed connection "
         "per instance; p50 and p99 come from h2load's `--log-file` (one line per request). "
         if has_h2 else "")
      + "CPU is the proxy process's "
      "utime+stime (`/proc/PID/stat`) over the rounds divided by the requests it served; "
      "user / system splits it into the process's own code and the kernel's work for it.")
    w("")
    for load in ["sat", "one"]:
        throughput_table(load)
    w(f"**paced, `-t1 -c{a.paced_conns}`, {a.paced_delay_ms} ms before each request "
      f"(~{a.rate:,} req/s)**: added = target minus direct in the same round.")
    w("")
    w("| target | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs "
      "| added p50 vs HAProxy | added p99 vs HAProxy | CPU µs/request |")
    w("|---|---|---|---|---|---|---|---|---|")
    added_ratio = {}
    for t in TARGETS:
        row = [fmt(median(per_round("paced", t, "rps"))),
               fmt(median(per_round("paced", t, "p50"))),
               fmt(median(per_round("paced", t, "p99")))]
        if t == "direct":
            row += ["–"] * 4
        else:
            ratios = []
            for key in ["p50", "p99"]:
                mine, theirs = added("paced", t, key), added("paced", "haproxy", key)
                # Below direct is noise, not a figure to divide by: left undetermined.
                valid = mine is not None and mine >= 0 and theirs is not None and theirs > 0
                r = mine / theirs if valid else None
                added_ratio[(t, key)] = r
                ratios.append(r)
            row += [fmt(added("paced", t, "p50")), fmt(added("paced", t, "p99"))]
            row += [fmt(r, 2, "×") if t != "haproxy" else "–" for r in ratios]
        row.append(fmt(cpu_us_per_request("paced", t), 1))
        w(f"| {label[t]} | " + " | ".join(row) + " |")
    w("")
    for load in H2_LOADS:
        if any(l == load for (_, l, _) in runs):
            throughput_table(load)
    has_h2_rss = any(when == "h2" for (_, when) in rss)
    w(f"**Memory** (VmRSS, MB = 10⁶ bytes): after the HTTP/1 loads above, then with {a.fleet:,} "
      "more instances in the table (service `fleet`, registered by `usher-bench-fleet`: one QUIC "
      "session per instance, heartbeating as an agent does; then 2 s of traffic to `fleet` "
      "so its reserver exists)"
      + (", and last after the HTTP/2 loads (up to 320 streams open at once, whose memory "
         "the allocator keeps)" if has_h2_rss else "") + ".")
    w("")
    extra = " | RSS MB after the HTTP/2 loads" if has_h2_rss else ""
    w(f"| process | RSS MB | RSS MB with {a.fleet:,} instances{extra} |")
    w("|---|---|---|" + ("---|" if has_h2_rss else ""))
    for name in ["haproxy", "usher-1t", "usher-mt"]:
        base, fleet = rss.get((name, "base")), rss.get((name, "fleet"))
        row = (f"| {label[name]} | {fmt(base and base * 1024 / 1e6, 1)} "
               f"| {fmt(fleet and fleet * 1024 / 1e6, 1)} |")
        if has_h2_rss:
            after = rss.get((name, "h2"))
            row += f" {fmt(after and after * 1024 / 1e6, 1)} |"
        w(row)
    w("")
    per_request = {n: i / r for n, (r, i) in instructions.items() if r}
    if per_request:
        w(f"**Instructions per request** (user space, valgrind's callgrind, `wrk -t1 -c8 "
          f"-d{a.instructions_duration}` and then `h2load -t1 -c8 -m1 "
          f"-D {a.instructions_duration}` against the same process, each after a 1 s warm-up; "
          "the count does not drift with the machine's other load; the kernel's share, the same "
          "system calls per request for both proxies, is not counted):")
        w("")
        w("| process | requests | instructions/request | vs HAProxy |")
        w("|---|---|---|---|")
        for protocol, suffix in [("HTTP/1.1, `wrk -t1 -c8`", ""),
                                 ("HTTP/2, `h2load -t1 -c8 -m1`", "-h2")]:
            base = per_request.get("haproxy" + suffix)
            for name in ["haproxy", "usher-1t"]:
                if name + suffix in per_request:
                    vs = per_request[name + suffix] / base if base else None
                    w(f"| {label[name]}, {protocol} | {instructions[name + suffix][0]:,} "
                      f"| {fmt(per_request[name + suffix])} | {fmt(vs, 2, '×')} |")
        w("")
    if errors:
        w(f"wrk counted {errors - h2_errors:,} errors (connect, read, write, timeout or non-2xx) "
          + (f"and h2load {h2_errors:,} (a client that completed nothing, a stream that failed or "
             "timed out, or a non-2xx) " if has_h2 else "")
          + "in all; see the raw log (`KEEP=1`).")
    else:
        w("No request failed (wrk: no connect, read, write or timeout error, no non-2xx"
          + ("; h2load: no failed, errored or timed-out stream, no non-2xx, every client served"
             if has_h2 else "") + ").")
    w("")
    w("Targets of issue 5 (ratios in this run):")
    w("")
    for t in USHERS:
        r = ratio("sat", t, "haproxy", "rps")
        w(f"- throughput at `-c32`, {label[t]}: {fmt(r, 2, '×')} HAProxy, target ≥ "
          f"{THROUGHPUT_TARGET}× — {verdict(None if r is None else r >= THROUGHPUT_TARGET)}")
    for t in USHERS:
        r50, r99 = added_ratio.get((t, "p50")), added_ratio.get((t, "p99"))
        ok = None if r50 is None or r99 is None else (
            r50 <= ADDED_LATENCY_TARGET and r99 <= ADDED_LATENCY_TARGET)
        w(f"- added latency at ~{a.rate:,} req/s, {label[t]}: p50 {fmt(r50, 2, '×')}, p99 "
          f"{fmt(r99, 2, '×')} HAProxy's, target ≤ {ADDED_LATENCY_TARGET}× — {verdict(ok)}"
          + ("" if ok is not None else " (an added latency below zero: noise at this size)"))
    for t in USHERS:
        kb = rss.get((t, "fleet"))
        mb = kb * 1024 / 1e6 if kb else None
        w(f"- RSS with {a.fleet:,} instances, {label[t]}: {fmt(mb, 1)} MB, target ≤ "
          f"{RSS_TARGET_MB:g} MB — {verdict(None if mb is None else mb <= RSS_TARGET_MB)}")
    section = "\n".join(out)
    print(section)
    write_docs(a.docs, section)


def write_docs(path, section):
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    block = f"{BEGIN}\n{section}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: block, doc, count=1)
    else:
        doc = doc.rstrip("\n") + f"\n\n{HEADING}\n\n`bench/proxy` (see `bench/README.md`).\n\n" \
            + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


if __name__ == "__main__":
    sys.exit(main())
