-- A JSON encoder in the style of lua-cjson fallbacks: recursive, buffers joined by table.concat.
local _M = {}

local concat, format, gsub, type, pairs, tostring = table.concat, string.format, string.gsub, type, pairs, tostring

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function escape(s)
    return (gsub(s, '[%c"\\]', function(c)
        return escapes[c] or format("\\u%04x", c:byte())
    end))
end

local encode_value

local function encode_table(t, buf)
    if #t > 0 then
        buf[#buf + 1] = "["
        for i = 1, #t do
            if i > 1 then buf[#buf + 1] = "," end
            encode_value(t[i], buf)
        end
        buf[#buf + 1] = "]"
        return
    end
    local keys = {}
    for k in pairs(t) do
        keys[#keys + 1] = tostring(k)
    end
    table.sort(keys)
    buf[#buf + 1] = "{"
    for i = 1, #keys do
        if i > 1 then buf[#buf + 1] = "," end
        buf[#buf + 1] = '"' .. escape(keys[i]) .. '":'
        encode_value(t[keys[i]], buf)
    end
    buf[#buf + 1] = "}"
end

encode_value = function(v, buf)
    local tv = type(v)
    if tv == "table" then
        encode_table(v, buf)
    elseif tv == "string" then
        buf[#buf + 1] = '"' .. escape(v) .. '"'
    elseif tv == "number" then
        buf[#buf + 1] = format("%.14g", v)
    elseif tv == "boolean" then
        buf[#buf + 1] = v and "true" or "false"
    else
        buf[#buf + 1] = "null"
    end
end

function _M.encode(v)
    local buf = {}
    encode_value(v, buf)
    return concat(buf)
end

return _M
