-- Shared by the wrk scripts: thread ids, the Authorization header, a JSON summary at the end.
local M = {}
local thread_count = 0

function M.setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

function M.authorize(key)
  if key ~= nil and key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
  end
end

-- One line the benchmark parses: counts, duration and latency percentiles in microseconds.
function M.done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end

return M
