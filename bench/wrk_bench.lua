-- wrk script for bench.py.  Environment:
--   BENCH_BODY_BYTES  POST a JSON body {"data": "xxx..."} of exactly this many bytes
--                     (below 12 bytes the body is "{}").
-- Every answer goes through response() so that any non-2xx status counts as an
-- error (wrk's own counter only sees status >= 400). It costs the load generator
-- little at the rates a Python server reaches.
-- done() prints one line that bench.py parses:
--   BENCH_RESULT requests=... p50_us=... p99_us=... non2xx=... socket_errors=...

local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0") or 0
local prefix, suffix = '{"data": "', '"}'

wrk.method = "POST"
if body_bytes >= #prefix + #suffix then
  wrk.body = prefix .. string.rep("x", body_bytes - #prefix - #suffix) .. suffix
else
  wrk.body = "{}"
end
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

non2xx = 0  -- per wrk thread; done() adds them up

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local bad = 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
  end
  io.write(string.format(
    "BENCH_RESULT requests=%.0f duration_us=%.0f bytes=%.0f non2xx=%.0f socket_errors=%.0f"
    .. " connect=%.0f read=%.0f write=%.0f timeout=%.0f"
    .. " p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f mean_us=%.1f\n",
    summary.requests, summary.duration, summary.bytes, bad,
    e.connect + e.read + e.write + e.timeout,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
