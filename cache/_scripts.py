"""The Lua scripts behind ``RedisCache``: every compare-and-write is one script over one key's hash tag.

Wire format 2. All that decides a put lives in ONE hash per cache key (``NS:{T}:e``), so Redis loses it
together or not at all (a restart without persistence, an eviction, a failover):

    v    the item's version (canonical decimal, no sign, no leading zeros)   } only while an item is stored
    d    the item's value (msgpack)                                          }
    fl   the floor version, only while NO item is stored (a stored item is always above the floor, so
         the floor is implied by it and dropped when an item is stored)
    inc  the key's incarnation: a random 63-bit id set when the hash is created and lost with it

The hash's own expiry is the item's ttl while an item is stored (none: persistent; an item stored over a
floor keeps at least the floor's remaining ttl), else the floor's ttl,
else (only an incarnation, taken by a lease) the lease ttl. The lock (``NS:{T}:l``, "<token>:<fence>")
and the last fence granted (``NS:{T}:c``) are separate keys under the same hash tag: a fence is
max(last + 1, the server clock in microseconds), so fences never repeat even after the counter is lost.

Versions travel as canonical decimal strings. Lua numbers are doubles, which lose integers above 2**53,
so versions are never passed through ``tonumber``: they are compared by length, then lexicographically,
and incremented digit by digit. A stored ``v`` or ``fl`` that is not a canonical decimal in 0..2**63-1,
or a key of another Redis type, is malformed: every script treats it as absent, and a put replaces it.

Each script returns a flat array whose first element is a status (see ``OK`` ... ``POISONED`` below),
except ``PUT_IF_NEWER``, which returns ``STORED``, ``OLDER`` or ``RECREATED``.
"""

from __future__ import annotations

import hashlib

__all__ = (
    "ADD",
    "DISCARD",
    "EXISTS",
    "GET_AND_LOCK",
    "GET_IF_NEWER",
    "INSERT",
    "INVALIDATE",
    "LEASE",
    "LOCKED",
    "LOST",
    "MISMATCH",
    "OK",
    "OLDER",
    "OVERFLOW",
    "POISONED",
    "PUT_AND_UNLOCK",
    "PUT_IF_NEWER",
    "RECREATED",
    "REMOVE",
    "STORED",
    "UNLOCK",
    "Script",
)

OK, MISMATCH, EXISTS, LOCKED, LOST, OVERFLOW, POISONED = 0, 1, 2, 3, 4, 5, 6
OLDER, STORED, RECREATED = 0, 1, 2


class Script:
    """A script's source and its SHA1, for EVALSHA with an EVAL fallback on NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.source = _PRELUDE + body
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:10]}>"


# Shared helpers. ``state(h)`` reads the entry hash as {v, d-less}: v and fl only when well-formed, inc;
# a key of another type is deleted (it is malformed, and nothing can be decided from it). ttl arguments
# are milliseconds as decimal strings, "" for none.
_PRELUDE = """
local MAX = '9223372036854775807'
local function vlt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function valid(s)
  if not s then return false end
  if s == '0' then return true end
  if #s > 19 or not string.match(s, '^[1-9][0-9]*$') then return false end
  return #s < 19 or s <= MAX
end
local function vnext(base)
  if not base then return '1' end
  if base == MAX then return nil end
  local head, nines = string.match(base, '^(.-)(9*)$')
  if head == '' then return '1' .. string.rep('0', #nines) end
  return string.sub(head, 1, -2) .. string.char(string.byte(head, -1) + 1) .. string.rep('0', #nines)
end
local function state(h)
  local got = redis.pcall('HMGET', h, 'v', 'fl', 'inc')
  if got['err'] then
    redis.call('DEL', h)
    return nil, nil, nil
  end
  local v, fl, inc = got[1], got[2], got[3]
  if not valid(v) then v = nil end
  if not valid(fl) then fl = nil end
  if not valid(inc) or inc == '0' then inc = nil end  -- a malformed incarnation: the key is new again
  return v, fl, inc
end
local function store(h, v, d, ttl, inc, newinc, fl)
  -- An item stored over a floor keeps the hash alive at least as long as the floor had left: the floor
  -- is implied by the item, and must not die with a shorter-lived item.
  local keep = ttl
  if fl and ttl ~= '' then
    local pttl = redis.call('PTTL', h)
    if pttl > tonumber(ttl) then keep = tostring(pttl) end
  end
  redis.call('HSET', h, 'v', v, 'd', d, 'inc', inc or newinc)
  redis.call('HDEL', h, 'fl')
  if keep == '' then redis.call('PERSIST', h) else redis.call('PEXPIRE', h, keep) end
end
local function set_floor(h, v, fl, inc, newinc, ttl)
  if fl and vlt(v, fl) then v = fl end
  local pttl = redis.call('PTTL', h)
  redis.call('HDEL', h, 'v', 'd')
  redis.call('HSET', h, 'fl', v, 'inc', inc or newinc)
  local keep = tonumber(ttl)
  if fl and pttl > keep then keep = pttl end
  redis.call('PEXPIRE', h, keep)
end
local function lock_refusal(lkey, owner)
  local held = redis.call('GET', lkey)
  if owner == '' then
    if held then return 3 end
    return nil
  end
  if held == owner then return nil end
  if held then return 3 end
  return 4
end
"""

LEASE = Script(
    "lease",
    """
local _, _, inc = state(KEYS[1])
if inc then return inc end
redis.call('HSET', KEYS[1], 'inc', ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 and redis.call('HLEN', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return ARGV[1]
""",
)

GET_IF_NEWER = Script(
    "get_if_newer",
    """
local got = redis.pcall('HMGET', KEYS[1], 'v')
if got['err'] then return {6} end
local cur = got[1]
if not cur then
  if redis.call('HEXISTS', KEYS[1], 'd') == 1 then return {6} end  -- a value without a version
  return {0}
end
if not valid(cur) then return {6, cur} end
if not vlt(ARGV[1], cur) then return {0} end
return {0, cur, redis.call('HGET', KEYS[1], 'd')}
""",
)

PUT_IF_NEWER = Script(
    "put_if_newer",
    """
local v = ARGV[1]
local cur, fl, inc = state(KEYS[1])
if ARGV[4] ~= '' and inc ~= ARGV[4] then return 2 end
if cur and not vlt(cur, v) then return 0 end
if fl and not vlt(fl, v) then return 0 end
store(KEYS[1], v, ARGV[2], ARGV[3], inc, ARGV[5], fl)
return 1
""",
)

DISCARD = Script(
    "discard",
    """
local got = redis.pcall('HMGET', KEYS[1], 'v', 'd')
if got['err'] or got[1] == ARGV[1] or (ARGV[1] == '' and not got[1] and got[2]) then
  return redis.call('DEL', KEYS[1])
end
return 0
""",
)

ADD = Script(
    "add",
    """
local cur, fl, inc = state(KEYS[1])
if cur then return {2} end
local v = vnext(fl)
if not v then return {5} end
store(KEYS[1], v, ARGV[1], ARGV[2], inc, ARGV[3], fl)
return {0, v}
""",
)

INSERT = Script(
    "insert",
    """
local refusal = lock_refusal(KEYS[2], ARGV[4])
if refusal then return {refusal} end
local cur, fl, inc = state(KEYS[1])
if ARGV[3] ~= '' and cur ~= ARGV[3] then return {1, cur or ''} end
local v = vnext(cur or fl)
if not v then return {5} end
store(KEYS[1], v, ARGV[1], ARGV[2], inc, ARGV[5], fl)
return {0, v}
""",
)

REMOVE = Script(
    "remove",
    """
local refusal = lock_refusal(KEYS[2], ARGV[2])
if refusal then return {refusal} end
local cur, fl, inc = state(KEYS[1])
if ARGV[1] ~= '' and cur ~= ARGV[1] then return {1, cur or ''} end
if not cur then return {0, 0} end
set_floor(KEYS[1], cur, nil, inc, ARGV[4], ARGV[3])
return {0, 1}
""",
)

INVALIDATE = Script(
    "invalidate",
    """
local cur, fl, inc = state(KEYS[1])
if cur and vlt(ARGV[1], cur) then return {0} end
set_floor(KEYS[1], ARGV[1], fl, inc, ARGV[3], ARGV[2])
return {0}
""",
)

GET_AND_LOCK = Script(
    "get_and_lock",
    """
if redis.call('EXISTS', KEYS[2]) == 1 then return {3, redis.call('PTTL', KEYS[2])} end
local last = redis.call('GET', KEYS[3])
if not valid(last) then last = nil end
local fence = vnext(last) or MAX
local now = redis.call('TIME')
local micros = string.format('%d', tonumber(now[1]) * 1000000 + tonumber(now[2]))
if vlt(fence, micros) then fence = micros end
redis.call('SET', KEYS[3], fence)
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
local cur = state(KEYS[1])
if not cur then return {0, fence, '', ''} end
return {0, fence, cur, redis.call('HGET', KEYS[1], 'd')}
""",
)

PUT_AND_UNLOCK = Script(
    "put_and_unlock",
    """
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return {4} end
local cur, fl, inc = state(KEYS[1])
local v = vnext(cur or fl)
if not v then return {5} end
store(KEYS[1], v, ARGV[1], ARGV[2], inc, ARGV[4], fl)
redis.call('DEL', KEYS[2])
return {0, v}
""",
)

UNLOCK = Script(
    "unlock",
    """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {4} end
redis.call('DEL', KEYS[1])
return {0, 0}
""",
)
