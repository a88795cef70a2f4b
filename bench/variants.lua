-- wrk script for the exactly-once benchmark (python -m bench.exactly_once): POSTs increments
-- to random keys of "<prefix>:1..keys" with value 1, as one of
--
--   batch=N      a batch body {"increments": [N items]} (path /increments)
--   keyed=1      an Idempotency-Key of its own on every request ("<prefix>-<thread>-<n>")
--   durable=1    Prefer: durable (answered after the commit: 204)
--
-- Script args (after --, name=value): keys (default 1000), prefix, batch (default 1), keyed,
-- durable. done() prints BENCH_JSON {...}: requests, items (what was acknowledged: requests
-- answered 202 or 204 times the batch size), non_2xx, latency percentiles in microseconds.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

acked, non_2xx = 0, 0
local keys, prefix, batch, keyed
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
  prefix = opts.prefix or "eo"
  batch = tonumber(opts.batch or "1")
  keyed = opts.keyed == "1"
  if opts.durable == "1" then
    headers["Prefer"] = "durable"
  end
  math.randomseed(os.time() * 100 + (tid or 0))
end

local function item()
  return '{"key":"' .. prefix .. ":" .. math.random(1, keys) .. '","value":1}'
end

function request()
  seq = seq + 1
  if keyed then
    headers["Idempotency-Key"] = prefix .. "-" .. (tid or 0) .. "-" .. seq
  end
  if batch == 1 then
    return wrk.format("POST", "/increment", headers, item())
  end
  local items = {}
  for i = 1, batch do
    items[i] = item()
  end
  return wrk.format("POST", "/increments", headers, '{"increments":[' .. table.concat(items, ",") .. "]}")
end

function response(status, hdrs, body)
  if status == 202 or status == 204 then
    acked = acked + batch
  else
    non_2xx = non_2xx + 1
  end
end

function done(summary, latency, requests)
  local totals = { acked = 0, non_2xx = 0 }
  for _, thread in ipairs(threads) do
    totals.acked = totals.acked + (tonumber(thread:get("acked")) or 0)
    totals.non_2xx = totals.non_2xx + (tonumber(thread:get("non_2xx")) or 0)
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"items":%d,"non_2xx":%d,"errors":%d,'
      .. '"latency_us":{"p50":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, totals.acked, totals.non_2xx,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
