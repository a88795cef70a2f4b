-- wrk script of bench.tokens' flood: POST /api/increment, each request with the next of the
-- distinct well-formed (right prefix, length and checksum) but unknown tokens in the file
-- tokens=<path>, one per line; each thread starts at its own offset and wraps around.
-- done() prints FLOOD_JSON {"requests", "s401", "s503", "other"}.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

s401, s503, other = 0, 0, 0
local tokens = {}
local at = 0

function init(args)
  local file
  for _, arg in ipairs(args) do
    local value = arg:match("^tokens=(.*)$")
    if value then file = value end
  end
  for line in io.lines(file) do
    tokens[#tokens + 1] = line
  end
  at = ((tid or 1) - 1) * math.floor(#tokens / 8)
end

local body = '{"key":"flood","value":1}'

function request()
  at = at % #tokens + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[at],
  }
  return wrk.format("POST", "/api/increment", headers, body)
end

function response(status, hdrs, resp)
  if status == 401 then
    s401 = s401 + 1
  elseif status == 503 then
    s503 = s503 + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local t = { s401 = 0, s503 = 0, other = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(t) do
      t[name] = t[name] + (tonumber(thread:get(name)) or 0)
    end
  end
  io.write(string.format(
    'FLOOD_JSON {"requests":%d,"duration_us":%d,"s401":%d,"s503":%d,"other":%d}\n',
    summary.requests, summary.duration, t.s401, t.s503, t.other))
end
