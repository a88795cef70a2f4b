-- wrk script: POST {"key": "<prefix>:<n>", "value": 1} with n drawn at random from 1..keys.
--
--   wrk -t2 -c64 -d5s -s bench/increment.lua http://127.0.0.1:3333 -- \
--       keys=1000 prefix=run1-svc path=/increment main_seconds=4 cookie='AIOHTTP_SESSION=...'
--
-- Script args (after --, name=value): keys (default 1000), prefix (default "bench"), path
-- (default /increment), cookie (a Cookie header value, optional), authorization (an
-- Authorization header value, optional: "Bearer isvc_..."), main_seconds (optional).
--
-- Correctness accounting: wrk stops at the end of -d with requests still in flight, which the
-- server may apply although wrk never sees their 202. So after main_seconds every thread sends
-- to "<prefix>-drain:<n>" instead (same cost, so throughput and latency are unaffected), and
-- each request carries X-Request-ID "m..." (main phase) or "d..." (drain). The service echoes
-- X-Request-ID, so response() can attribute each 202 to its phase: the keys under "<prefix>:"
-- must sum to exactly acked_main. Servers that do not echo the header count in acked_other.
--
-- done() prints one line: BENCH_JSON {...} with wrk's summary, latency percentiles in
-- microseconds and the per-thread counters summed.

local ffi_ok, ffi = pcall(require, "ffi")
local now = os.time
if ffi_ok then
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
    int clock_gettime(int clk_id, bench_timespec_t *tp);
  ]])
  local ts = ffi.new("bench_timespec_t")
  now = function()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
end

local COUNTERS = {
  "sent_main", "sent_drain", "acked_main", "acked_drain", "acked_other", "non_202",
}

-- Main thread (setup, done).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

-- Worker threads (init, request, response). Counters are globals so done() can read them
-- with thread:get().
sent_main, sent_drain, acked_main, acked_drain, acked_other, non_202 = 0, 0, 0, 0, 0, 0

local keys, prefix, drain_prefix, path, main_until
local headers = { ["Content-Type"] = "application/json" }
local seq = 0

function init(args)
  local opts = {}
  for _, arg in ipairs(args) do
    local name, value = arg:match("^([%w_]+)=(.*)$")
    if name then
      opts[name] = value
    end
  end
  keys = tonumber(opts.keys or "1000")
  prefix = opts.prefix or "bench"
  drain_prefix = prefix .. "-drain"
  path = opts.path or "/increment"
  local main_seconds = tonumber(opts.main_seconds or "0")
  main_until = main_seconds > 0 and now() + main_seconds or math.huge
  if opts.cookie and opts.cookie ~= "" then
    headers["Cookie"] = opts.cookie
  end
  if opts.authorization and opts.authorization ~= "" then
    headers["Authorization"] = opts.authorization
  end
  math.randomseed(os.time() * 100 + (tid or 0))
end

function request()
  seq = seq + 1
  local n = math.random(1, keys)
  local key_prefix, tag
  if now() < main_until then
    key_prefix, tag = prefix, "m"
    sent_main = sent_main + 1
  else
    key_prefix, tag = drain_prefix, "d"
    sent_drain = sent_drain + 1
  end
  headers["X-Request-ID"] = tag .. (tid or 0) .. "-" .. seq
  local body = '{"key":"' .. key_prefix .. ":" .. n .. '","value":1}'
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
  if status ~= 202 then
    non_202 = non_202 + 1
    return
  end
  local rid = hdrs["X-Request-ID"] or hdrs["x-request-id"]
  if rid == nil then
    acked_other = acked_other + 1
  elseif rid:sub(1, 1) == "m" then
    acked_main = acked_main + 1
  else
    acked_drain = acked_drain + 1
  end
end

function done(summary, latency, requests)
  local totals = {}
  for _, name in ipairs(COUNTERS) do
    totals[name] = 0
    for _, thread in ipairs(threads) do
      totals[name] = totals[name] + (tonumber(thread:get(name)) or 0)
    end
  end
  local e = summary.errors
  local parts = {
    string.format('"requests":%d,"duration_us":%d,"bytes":%d', summary.requests,
      summary.duration, summary.bytes),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
      e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}',
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean),
  }
  for _, name in ipairs(COUNTERS) do
    table.insert(parts, string.format('"%s":%d', name, totals[name]))
  end
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
