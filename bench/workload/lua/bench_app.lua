-- Entry points of the APISIX-like handler: access (route + plugin chain), content (JSON).
local router = require "bench_router"
local plugins = require "bench_plugins"
local json = require "bench_json"

local _M = {}
local seq = 0

function _M.access()
    seq = seq + 1
    local uri = ngx.var.uri
    local headers = ngx.req.get_headers()
    local route = router.match(ngx.req.get_method(), headers["host"] or "", uri)
    if not route then
        return ngx.exit(404)
    end
    local ctx = {
        uri = uri,
        route = route,
        headers = headers,
        remote = ngx.var.remote_addr,
        window = math.floor(ngx.now() / 60),
        seq = seq,
        resp_headers = {},
    }
    plugins.run(ctx)
    ngx.ctx.bench = ctx
end

function _M.content()
    local ctx = ngx.ctx.bench
    local body = {
        route = { id = ctx.route.id, prefix = ctx.route.prefix, plugins = ctx.route.plugins,
                  upstream = ctx.route.upstream },
        consumer = ctx.consumer,
        upstream_uri = ctx.upstream_uri,
        segments = ctx.segments,
        request_id = ctx.request_id,
        headers = ctx.resp_headers,
        digest = ctx.header_digest,
        items = {},
    }
    for i = 1, 20 do
        body.items[i] = { id = i, name = "item \"" .. i .. "\"", price = i * 1.25, tags = { "a", "b", ctx.rid_prefix } }
    end
    for k, v in pairs(ctx.resp_headers) do
        ngx.header[k] = v
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(json.encode(body))
end

return _M
