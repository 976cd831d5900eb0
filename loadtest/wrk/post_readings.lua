-- POST synthetic readings, each unique (device, timestamp), four metrics each.
-- args: path prefix readings_per_request devices base_unix_seconds [api_key]
-- Reading n of a thread goes to device `<prefix><thread>-<n % devices>` at second
-- `base + n // devices`: a fleet of `devices` devices per thread, each reporting once a second.
package.path = debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local counter = 0

function init(args)
  path = args[1]
  prefix = args[2] .. tid .. "-"
  per_request = tonumber(args[3])
  devices = tonumber(args[4])
  base = tonumber(args[5])
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  common.authorize(args[6])
end

local function reading(n)
  return string.format(
    '{"device":"%s%d","timestamp":%d,"heartRateValue":%d,"spo2":%d,' ..
    '"respiratoryRate":%d,"temperature":%.1f}',
    prefix, n % devices, base + math.floor(n / devices),
    60 + (n * 7) % 40, 94 + n % 6, 12 + n % 9, 36.4 + (n % 12) / 10)
end

function request()
  local body
  if per_request == 1 then
    body = reading(counter)
    counter = counter + 1
  else
    local parts = {}
    for j = 1, per_request do
      parts[j] = reading(counter)
      counter = counter + 1
    end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format(nil, path, nil, body)
end
