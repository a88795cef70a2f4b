-- wrk script of the paired A/B (python -m bench.paired): increment.lua as it is (random keys,
-- the main and drain phases, X-Request-ID per phase, one BENCH_JSON line), plus two script
-- args:
--
--   keyed=1      an Idempotency-Key of its own on every request ("<prefix>-<thread>-<n>")
--   durable=1    Prefer: durable (answered 204 after the commit)
--
-- A 204 is an acknowledgement like a 202: it is counted as one in increment.lua's acked_*
-- counters, so the keys under "<prefix>:" must sum to exactly acked_main. done() prints a
-- second line, PAIRED_JSON {"s204": N}, the number of 204s among them.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "increment.lua")

local base_setup, base_init, base_response, base_done = setup, init, response, done
local format = wrk.format
local mine = {}

function setup(thread)
  base_setup(thread)
  table.insert(mine, thread)
end

s204 = 0
local keyed, durable, key_prefix
local n = 0

function init(args)
  base_init(args)
  key_prefix = "paired"
  for _, arg in ipairs(args) do
    if arg == "keyed=1" then keyed = true end
    if arg == "durable=1" then durable = true end
    local value = arg:match("^prefix=(.*)$")
    if value then key_prefix = value end
  end
end

-- increment.lua's request() builds its headers and calls wrk.format: add ours there (wrk's
-- own call, for its default request, passes none).
wrk.format = function(method, path, headers, body)
  if headers then
    n = n + 1
    if keyed then headers["Idempotency-Key"] = key_prefix .. "-" .. (tid or 0) .. "-" .. n end
    if durable then headers["Prefer"] = "durable" end
  end
  return format(method, path, headers, body)
end

function response(status, hdrs, body)
  if status == 204 then
    s204 = s204 + 1
    status = 202
  end
  base_response(status, hdrs, body)
end

function done(summary, latency, requests)
  base_done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(mine) do
    total = total + (tonumber(thread:get("s204")) or 0)
  end
  io.write(string.format('PAIRED_JSON {"s204":%d}\n', total))
end
