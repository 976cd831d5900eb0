-- GET paths read from a file, one per line, in turn (each thread starts at its own offset).
-- args: paths_file [api_key]
package.path = debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua;" .. package.path
local common = require("common")
setup = common.setup
done = common.done

local paths = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then paths[#paths + 1] = line end
  end
  i = (tid * 37) % #paths
  common.authorize(args[2])
end

function request()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
