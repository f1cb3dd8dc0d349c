-- wrk script of bench/proxy: prints one machine-readable summary line at the end, and with an
-- argument (`-- DELAY_MS`) waits that long before each request on a connection, so that
-- C connections send about C * 1000 / DELAY_MS requests per second (paced load).
--
--   wrk -t1 -c10 -d10s --latency -s bench/proxy.d/wrk.lua URL -- 5    # ~2,000 req/s

function init(args)
   local ms = tonumber(args[1])
   if ms and ms > 0 then
      -- wrk calls `delay` before each request when the script defines it.
      delay = function() return ms end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
      '"mean_us": %.1f, "max_us": %d, "errors": {"connect": %d, "read": %d, ' ..
      '"write": %d, "status": %d, "timeout": %d}}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
