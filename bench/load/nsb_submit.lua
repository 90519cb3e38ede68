-- nsb_submit.lua: wrk script sending NServiceBus Gateway SingleCallSubmit requests.
--
-- Each request looks like what an NServiceBus site sends (protocol.md §1.3, §8.1): POST to the
-- channel path with 22 headers, names as sent, values URL-encoded with the .NET rules, a fixed body
-- and its Content-MD5 (base64 MD5, URL-encoded), and a fresh NServiceBus.Id per request.
--
--   wrk -t1 -c64 -d10s --latency -s bench/load/nsb_submit.lua http://127.0.0.1:8080/RemoteSite/
--
-- Settings come from the environment (bench/load/run_load.py sets them):
--   NSB_BODY_FILE    the request body. LuaJIT has no MD5, so whoever chooses the body computes
--   NSB_CONTENT_MD5  its base64 MD5 and passes it here. Both unset: the built-in 1 KiB body below.
--   NSB_RUN_PREFIX   12 hex digits, different for every wrk run (else a second run would replay the
--                    first one's ids as duplicates). Unset: derived from the clock.
--   NSB_DUP_PERCENT  0-100 (default 0): share of requests that resend a recently sent id.
--   NSB_DELAY_MS     think time in ms before each request on a connection (default 0 = none).
--                    wrk takes whole milliseconds. Offered rate ~ connections*1000/(delay+latency).
--   NSB_THINK        "exp" (default): each think time is drawn from an exponential distribution
--                    with mean NSB_DELAY_MS, so arrivals approximate a Poisson stream (what many
--                    independent senders produce); "fixed": exactly NSB_DELAY_MS every time. With a
--                    fixed think time every connection answered by one group commit comes back in
--                    the same millisecond, and the server sees lock-step bursts of a whole batch.

local bit = require("bit")

-- Built-in body: must stay byte-identical to run_load.py's make_body(1024).
local DEFAULT_BODY = '{"Payload":"' .. string.rep("x", 1010) .. '"}'
local DEFAULT_MD5 = "3hjVkYLGbPzHr18YICku4A=="

-- The dedup check and the store see realistic ids only if new ids land all over the key space,
-- like the random GUIDs senders use, not in one ascending run after the prefix.
-- hash32 (two xorshift-multiply rounds) is a bijection on 32 bits: distinct counters never collide.
local function mul32(a, b)
   -- (a*b) mod 2^32 without losing bits in a double: split a into 16-bit halves.
   local lo = a % 65536
   local hi = (a - lo) / 65536
   return bit.tobit(((hi * b) % 65536) * 65536 + lo * b)
end

local function hash32(x)
   x = bit.bxor(x, bit.rshift(x, 16))
   x = mul32(x % 4294967296, 0x045d9f3b)
   x = bit.bxor(x, bit.rshift(x, 16))
   x = mul32(x % 4294967296, 0x045d9f3b)
   return bit.bxor(x, bit.rshift(x, 16))
end

-- URL-encoding of a base64 value (WebUtility.UrlEncode of A-Z a-z 0-9 + / =).
local function urlencode_b64(s)
   return (s:gsub("[+/=]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

-- setup() runs once per thread in the main Lua state: hand each thread its number.
local next_thread = 0
function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
end

-- Everything below runs in each wrk thread's own Lua state.

local body, pieces, prefix, dup_share, delay_ms, think_exp
local counter = 0
local RECENT = 4096            -- ring of recently sent ids that duplicates are drawn from
local recent, recent_n, recent_pos = {}, 0, 0

function init(args)
   thread_id = thread_id or 0
   local body_file = os.getenv("NSB_BODY_FILE")
   local md5 = os.getenv("NSB_CONTENT_MD5")
   if body_file and body_file ~= "" then
      local f = assert(io.open(body_file, "rb"), "NSB_BODY_FILE: cannot open " .. body_file)
      body = f:read("*a")
      f:close()
      assert(md5 and md5 ~= "", "NSB_BODY_FILE needs NSB_CONTENT_MD5 (base64 MD5 of the body)")
   else
      body, md5 = DEFAULT_BODY, md5 or DEFAULT_MD5
   end
   prefix = os.getenv("NSB_RUN_PREFIX")
   if not prefix or prefix == "" then
      prefix = string.format("%012x", os.time() % 281474976710656)
   end
   assert(#prefix == 12 and prefix:match("^%x+$"), "NSB_RUN_PREFIX must be 12 hex digits")
   dup_share = (tonumber(os.getenv("NSB_DUP_PERCENT") or "0") or 0) / 100
   delay_ms = math.floor(tonumber(os.getenv("NSB_DELAY_MS") or "0") or 0)
   local think = os.getenv("NSB_THINK") or "exp"
   assert(think == "exp" or think == "fixed", "NSB_THINK must be exp or fixed")
   think_exp = think == "exp"
   if delay_ms <= 0 then
      delay = nil   -- no think time: wrk skips the per-request timer entirely
   end
   math.randomseed(os.time() + 7919 * thread_id)

   -- The request is built once with wrk.format, with a placeholder where the id goes, and cut
   -- at the placeholders; request() only splices the new id in. Calling wrk.format for every
   -- request (pairs() over 22 headers, string.format each, table.concat) took ~9 us of Lua per
   -- request against ~4 us for the splice, which made one wrk thread slower than the bare server.
   -- 20 headers here + Host + Content-Length (added by wrk.format) = the 22 lines of §8.1.
   local ID = "\1ID\1"
   local headers = {
      ["NServiceBus.Id"] = ID,
      ["NServiceBus.CorrelationId"] = ID,
      ["NServiceBus.ReplyToAddress"] = "Headquarters",
      ["NServiceBus.Header.NServiceBus.MessageId"] = ID,
      ["NServiceBus.Header.NServiceBus.MessageIntent"] = "Send",
      ["NServiceBus.Header.NServiceBus.ConversationId"] = ID,
      ["NServiceBus.Header.NServiceBus.CorrelationId"] = ID,
      ["NServiceBus.Header.NServiceBus.ReplyToAddress"] = "Headquarters",
      ["NServiceBus.Header.NServiceBus.OriginatingEndpoint"] = "Headquarters",
      ["NServiceBus.Header.NServiceBus.OriginatingMachine"] = "HQ-SRV01",
      ["NServiceBus.Header.NServiceBus.ContentType"] = "application%2Fjson",
      ["NServiceBus.Header.NServiceBus.EnclosedMessageTypes"] =
         "Shared.UpdatePrice%2C+Shared%2C+Version%3D1.0.0.0%2C+Culture%3Dneutral%2C+PublicKeyToken%3Dnull",
      ["NServiceBus.Header.NServiceBus.Version"] = "10.2.8",
      ["NServiceBus.Header.NServiceBus.TimeSent"] = "2026-08-20+10%3A15%3A30%3A123456+Z",
      ["NServiceBus.Header.NServiceBus.DestinationSites"] = "RemoteSite",
      ["NServiceBus.Header.NServiceBus.OriginatingSite"] =
         "http%2Chttp%3A%2F%2Flocalhost%3A25899%2FHeadquarters%2F",
      ["NServiceBus.Gateway"] = "True",
      ["NServiceBus.CallType"] = "SingleCallSubmit",
      ["Content-Type"] = "application/x-www-form-urlencoded",
      ["Content-MD5"] = urlencode_b64(md5),
   }
   local template = wrk.format("POST", nil, headers, body)
   pieces = {}
   for piece in (template .. ID):gmatch("(.-)" .. ID) do
      pieces[#pieces + 1] = piece
   end
   assert(#pieces == 6, "expected the id in 5 headers")
end

-- A GUID-shaped id, unique per (run prefix, thread, counter): hash32(counter)-thread-4000-8000-prefix.
local function new_id()
   counter = counter + 1
   local id = string.format("%s-%04x-4000-8000-%s", bit.tohex(hash32(counter), 8), thread_id % 65536, prefix)
   recent_pos = recent_pos % RECENT + 1
   recent[recent_pos] = id
   if recent_n < RECENT then recent_n = recent_n + 1 end
   return id
end

local function next_id()
   if dup_share > 0 and recent_n > 0 and math.random() < dup_share then
      return recent[math.random(recent_n)]
   end
   return new_id()
end

function request()
   local id, p = next_id(), pieces
   return p[1] .. id .. p[2] .. id .. p[3] .. id .. p[4] .. id .. p[5] .. id .. p[6]
end

function delay()
   if think_exp then
      -- inverse CDF of the exponential distribution, rounded to wrk's whole milliseconds
      return math.floor(-math.log(1 - math.random()) * delay_ms + 0.5)
   end
   return delay_ms
end

-- done() runs in the main Lua state after the run: one machine-readable line with exact values
-- (microseconds) next to wrk's rounded text report. run_load.py reads it if present.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "NSB_RESULT requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
      "lat_mean_us=%.1f lat_max_us=%d p50_us=%d p90_us=%d p99_us=%d p999_us=%d\n",
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
