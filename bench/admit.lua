-- wrk script: POST /engines/{user}/admit for a running engine, the call a product makes
-- before every user request. The platform key and the user come from the environment
-- (BAP_BENCH_PLATFORM_KEY, BAP_BENCH_USER), so the key never appears on a command line.
-- done() prints one machine-readable line (BENCH_JSON {...}) that bench/core.py parses.

local key = os.getenv("BAP_BENCH_PLATFORM_KEY")
local user = os.getenv("BAP_BENCH_USER") or "wrk-user"
if key == nil or key == "" then
  io.stderr:write("admit.lua: BAP_BENCH_PLATFORM_KEY is not set\n")
  os.exit(2)
end

wrk.method = "POST"
wrk.path = "/engines/" .. user .. "/admit"
wrk.body = '{"auto_provision":false,"auto_wake":false}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Platform-Key"] = key

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
