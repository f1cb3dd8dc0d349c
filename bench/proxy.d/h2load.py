#!/usr/bin/env python3
"""Turns one h2load run of bench/proxy into the JSON summary wrk.lua prints, so that
results.tsv and report.py treat both alike:

    {"requests", "duration_us", "p50_us", "p99_us", "mean_us", "max_us",
     "errors": {"connect", "read", "write", "status", "timeout"}}

Usage: h2load.py OUTPUT LOG DURATION_US

OUTPUT is h2load's standard output, LOG the file of its `--log-file` (one line per request
closed in the measured window: start time µs, status, µs until the end of the response,
tab-separated), DURATION_US its `-D` in µs: h2load counts the requests closed in that window
and divides by it for its req/s, and so does the report.

- requests: the responses received (h2load's `done` minus its `errored`), whatever their status;
- p50/p99/mean/max: over those responses' times in LOG (h2load prints no percentiles);
- errors.status: responses other than 2xx (wrk counts status >= 400; a 3xx is no answer from
  nginx either);
- errors.read: streams that ended without a response (`errored`), and any other `failed`
  request h2load counted that is not a non-2xx response;
- errors.timeout: h2load's `timeout`;
- errors.connect: 1 when some client completed no request at all, or none did (h2load counts
  no error for a connection it could not make, or one closed before its first response);
- errors.write: 0 (h2load has no such count).
"""

import json
import math
import re
import sys


def percentile(sorted_values, p):
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def count(pattern, text, what):
    m = re.search(pattern, text, re.M)
    if not m:
        sys.exit(f"h2load.py: no {what} in h2load's output")
    return [int(g) for g in m.groups()]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        out = f.read()
    duration_us = int(sys.argv[3])
    _total, _started, done, _succeeded, failed, errored, timeout = count(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout$", out, "requests line")
    _s2, s3, s4, s5 = count(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx$",
                           out, "status codes line")
    # Per client: min, max, mean... of its req/s; a client that could not connect counts 0.
    m = re.search(r"^req/s\s*:\s*(\d+\.\d+)\s", out, re.M)
    if not m:
        sys.exit("h2load.py: no per-client req/s line in h2load's output")
    client_rps_min = float(m.group(1))

    times, non2xx = [], 0
    with open(sys.argv[2]) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) < 3:
                continue
            status, us = int(parts[1]), int(parts[2])
            if status <= 0:  # no response: counted in `errored`
                continue
            times.append(us)
            if not 200 <= status < 300:
                non2xx += 1
    times.sort()

    requests = done - errored
    status_errors = max(non2xx, s3 + s4 + s5)
    read_errors = errored + max(0, failed - errored - status_errors)
    connect_errors = 1 if done == 0 or client_rps_min == 0 else 0
    summary = {
        "requests": requests,
        "duration_us": duration_us,
        "p50_us": percentile(times, 50),
        "p99_us": percentile(times, 99),
        "mean_us": round(sum(times) / len(times), 1) if times else 0.0,
        "max_us": times[-1] if times else 0,
        "errors": {"connect": connect_errors, "read": read_errors, "write": 0,
                   "status": status_errors, "timeout": timeout},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
