-- Lua workloads of the kernel matrix's guest checks (scripts/kernel-matrix/checks.sh), one
-- handler per check, each spending its time in named local functions the checks look for
-- in the recorded stacks: burn_a / burn_b (CPU), blocker (a blocking system call),
-- make_tables / build_strings (allocations), leak_some / make_garbage (a leak beside garbage).
local ffi = require "ffi"
ffi.cdef [[
    int usleep(unsigned int usec);
]]

local _M = {}
local seq = 0

local function burn_a(n)
    local x = 0
    for i = 1, n do
        x = (x * 31 + i) % 1000003
    end
    return x
end

local function burn_b(n)
    local s = 0
    for i = 1, n do
        s = s + (i % 7) * (i % 13)
    end
    return s
end

-- CPU: two thirds of the time in burn_a, one third in burn_b.
function _M.cpu()
    return burn_a(200000) + burn_b(100000)
end

-- Blocks the worker in usleep(2) for `us` microseconds.
local function blocker(us)
    ffi.C.usleep(us)
    return us
end

function _M.block(us)
    local r = blocker(us)
    return r
end

local function make_tables(n)
    local keep = {}
    for i = 1, n do
        keep[i] = { i, i + 1, i + 2, k = i }
    end
    return keep
end

local function build_strings(n)
    local keep = {}
    local chunk = string.rep("b", 700)
    for i = 1, n do
        keep[i] = chunk .. seq .. ":" .. i
    end
    return keep
end

-- Allocation: tables and strings that become garbage at once.
function _M.alloc()
    seq = seq + 1
    local a = make_tables(1500)
    local b = build_strings(120)
    return #a + #b
end

-- Keeps a table of 64 numbers per call in the global LEAKS (made in init_by_lua).
local function leak_some()
    local e = { seq = seq }
    for i = 1, 64 do
        e[i] = seq + i
    end
    LEAKS[#LEAKS + 1] = e
    return #LEAKS
end

-- Garbage beside the leak, so the collector keeps running cycles.
local function make_garbage()
    local t = {}
    for i = 1, 100 do
        t[i] = { i, "g" .. seq .. ":" .. i }
    end
    return #t
end

-- Not `return leak_some()`: a tail call would replace this frame, and leak_some's frame
-- would be named after the call site in the handler's chunk.
function _M.leak()
    seq = seq + 1
    make_garbage()
    local n = leak_some()
    return n
end

return _M
