-- wrk script: spreads requests over the 300 routes and 70 API keys of the bench workload.
local n = 0
request = function()
    n = n + 1
    local i = (n * 7919) % 300 + 1
    local path = string.format("/api/v%d/svc%d/items/%d?page=%d", i % 4, i, n % 1000, n % 7)
    local host = (i % 10 == 0) and string.format("api%d.example.com", i % 7) or "api.example.com"
    return wrk.format("GET", path, { ["apikey"] = "key-" .. (n % 70), ["Host"] = host })
end
