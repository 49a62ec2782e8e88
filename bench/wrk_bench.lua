-- wrk script for bench.py: POST /score, count non-2xx answers, time every request.
--
-- Environment:
--   BENCH_BODY_BYTES  POST a JSON body {"data": "xxx..."} of exactly this many bytes
--                     (below 12 bytes the body is "{}").
--   BENCH_EXACT       "1" (bench.py sets it when wrk runs one thread per connection):
--                     time each request here and report exact per-request percentiles.
--
-- Why time requests here: wrk 4's own latency statistics are not per request. Each
-- thread samples a fixed number of latencies per interval and fills an interval it
-- could not fill with the run's maximum, so one stall of a second can turn p75 or
-- p99 into that second (a 1 s stall every 3,000 requests gave wrk p99 = 978 ms
-- where the true p99 is 0.1 ms). With one connection per thread, request() and
-- response() alternate, so the time between them is exactly one request's latency,
-- measured from the first write like wrk does (connection set-up excluded). Clock:
-- clock_gettime(CLOCK_MONOTONIC) through LuaJIT's FFI. Without FFI, or with several
-- connections per thread, wrk's own figures are reported instead.
--
-- Every answer goes through response() so that any non-2xx status counts as an
-- error (wrk's own counter only sees status >= 400).
--
-- done() prints one line that bench.py parses:
--   BENCH_RESULT requests=... non2xx=... socket_errors=... p50_us=... p99_us=... latency=exact|wrk

local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0") or 0
local prefix, suffix = '{"data": "', '"}'

wrk.method = "POST"
if body_bytes >= #prefix + #suffix then
  wrk.body = prefix .. string.rep("x", body_bytes - #prefix - #suffix) .. suffix
else
  wrk.body = "{}"
end
wrk.headers["Content-Type"] = "application/json"

local now_us
if os.getenv("BENCH_EXACT") == "1" then
  local ok, ffi = pcall(require, "ffi")
  if ok then
    ffi.cdef [[
      typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
      int clock_gettime(int clk_id, bench_timespec *tp);
    ]]
    local ts = ffi.new("bench_timespec")
    now_us = function()
      ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
    end
  end
end

-- Latency histogram: 1 us buckets below 100 us, then buckets 1% wide.
local LINEAR, STEP = 100, math.log(1.01)

local function bucket(us)
  if us < LINEAR then return math.floor(us) end
  return LINEAR + math.floor(math.log(us / LINEAR) / STEP)
end

local function bucket_value(k)
  if k < LINEAR then return k + 0.5 end
  return LINEAR * math.exp((k - LINEAR + 0.5) * STEP)
end

-- Per-thread state (each wrk thread runs its own copy of this script).
non2xx, timed, hist, max_us = 0, 0, {}, 0
local req, t0

function init(args)
  req = wrk.format()
end

if now_us then
  function request()
    t0 = now_us()
    return req
  end
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
  if t0 then
    local us = now_us() - t0
    local k = bucket(us)
    hist[k] = (hist[k] or 0) + 1
    timed = timed + 1
    if us > max_us then max_us = us end
    t0 = nil
  end
end

-- Main state: collect the threads so done() can add up their counters.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local bad, n, merged, keys, maxv = 0, 0, {}, {}, 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
    n = n + (t:get("timed") or 0)
    for k, v in pairs(t:get("hist") or {}) do
      merged[k] = (merged[k] or 0) + v
    end
    maxv = math.max(maxv, t:get("max_us") or 0)
  end
  for k in pairs(merged) do table.insert(keys, k) end
  table.sort(keys)

  local function pct(p)
    local rank, seen = math.max(1, math.ceil(p / 100 * n)), 0
    for _, k in ipairs(keys) do
      seen = seen + merged[k]
      if seen >= rank then return bucket_value(k) end
    end
    return 0
  end

  local e = summary.errors
  local exact = n > 0
  io.write(string.format(
    "BENCH_RESULT requests=%.0f duration_us=%.0f bytes=%.0f non2xx=%.0f socket_errors=%.0f"
    .. " connect=%.0f read=%.0f write=%.0f timeout=%.0f timed=%.0f"
    .. " p50_us=%.1f p90_us=%.1f p99_us=%.1f max_us=%.0f"
    .. " wrk_p50_us=%.0f wrk_p99_us=%.0f latency=%s\n",
    summary.requests, summary.duration, summary.bytes, bad,
    e.connect + e.read + e.write + e.timeout,
    e.connect, e.read, e.write, e.timeout, n,
    exact and pct(50) or latency:percentile(50),
    exact and pct(90) or latency:percentile(90),
    exact and pct(99) or latency:percentile(99),
    exact and maxv or latency.max,
    latency:percentile(50), latency:percentile(99),
    exact and "exact" or "wrk"))
end
