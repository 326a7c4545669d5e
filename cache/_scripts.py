"""The Lua scripts behind ``RedisCache``: every compare-and-write is one script over one key's hash tag.

Versions travel as canonical decimal strings (no sign, no leading zeros). Lua numbers are doubles, which
lose integers above 2**53, so versions are never passed through ``tonumber``: they are compared by length,
then lexicographically, and incremented digit by digit.

Each script returns a flat array whose first element is a status (see ``OK`` ... ``OVERFLOW`` below).
"""

from __future__ import annotations

import hashlib

__all__ = (
    "ADD",
    "EXISTS",
    "GET_AND_LOCK",
    "GET_IF_NEWER",
    "INSERT",
    "INVALIDATE",
    "LOCKED",
    "LOST",
    "MISMATCH",
    "OK",
    "OVERFLOW",
    "PUT_AND_UNLOCK",
    "PUT_IF_NEWER",
    "REMOVE",
    "UNLOCK",
    "Script",
)

OK, MISMATCH, EXISTS, LOCKED, LOST, OVERFLOW = 0, 1, 2, 3, 4, 5


class Script:
    """A script's source and its SHA1, for EVALSHA with an EVAL fallback on NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.source = _PRELUDE + body
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:10]}>"


# Shared helpers. Keys of one cache key: i = item hash {v, d}, f = floor, l = lock "token:fence",
# c = fence counter. ttl arguments are milliseconds as decimal strings, "" for none.
_PRELUDE = """
local MAX = '9223372036854775807'
local function vlt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function vnext(base)
  if not base then return '1' end
  if base == MAX then return nil end
  local head, nines = string.match(base, '^(.-)(9*)$')
  if head == '' then return '1' .. string.rep('0', #nines) end
  return string.sub(head, 1, -2) .. string.char(string.byte(head, -1) + 1) .. string.rep('0', #nines)
end
local function store(ikey, v, d, ttl)
  redis.call('HSET', ikey, 'v', v, 'd', d)
  if ttl == '' then redis.call('PERSIST', ikey) else redis.call('PEXPIRE', ikey, ttl) end
end
local function raise_floor(fkey, v, ttl)
  local cur = redis.call('GET', fkey)
  local pttl = redis.call('PTTL', fkey)
  local keep = tonumber(ttl)
  if pttl > keep then keep = pttl end
  if cur and not vlt(cur, v) then v = cur end
  if pttl == -1 then redis.call('SET', fkey, v) else redis.call('SET', fkey, v, 'PX', keep) end
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

GET_IF_NEWER = Script(
    "get_if_newer",
    """
local cur = redis.call('HGET', KEYS[1], 'v')
if not cur or not vlt(ARGV[1], cur) then return {0} end
return {0, cur, redis.call('HGET', KEYS[1], 'd')}
""",
)

PUT_IF_NEWER = Script(
    "put_if_newer",
    """
local v = ARGV[1]
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and not vlt(cur, v) then return 0 end
local floor = redis.call('GET', KEYS[2])
if floor and not vlt(floor, v) then return 0 end
store(KEYS[1], v, ARGV[2], ARGV[3])
return 1
""",
)

ADD = Script(
    "add",
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local v = vnext(redis.call('GET', KEYS[2]))
if not v then return {5} end
store(KEYS[1], v, ARGV[1], ARGV[2])
return {0, v}
""",
)

INSERT = Script(
    "insert",
    """
local refusal = lock_refusal(KEYS[3], ARGV[4])
if refusal then return {refusal} end
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[3] ~= '' and cur ~= ARGV[3] then return {1, cur or ''} end
local v = vnext(cur or redis.call('GET', KEYS[2]))
if not v then return {5} end
store(KEYS[1], v, ARGV[1], ARGV[2])
return {0, v}
""",
)

REMOVE = Script(
    "remove",
    """
local refusal = lock_refusal(KEYS[3], ARGV[2])
if refusal then return {refusal} end
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] ~= '' and cur ~= ARGV[1] then return {1, cur or ''} end
if not cur then return {0, 0} end
redis.call('DEL', KEYS[1])
raise_floor(KEYS[2], cur, ARGV[3])
return {0, 1}
""",
)

INVALIDATE = Script(
    "invalidate",
    """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and not vlt(ARGV[1], cur) then redis.call('DEL', KEYS[1]) end
raise_floor(KEYS[2], ARGV[1], ARGV[2])
return {0}
""",
)

GET_AND_LOCK = Script(
    "get_and_lock",
    """
if redis.call('EXISTS', KEYS[2]) == 1 then return {3, redis.call('PTTL', KEYS[2])} end
redis.call('INCR', KEYS[3])
-- Read the counter back as a string: Lua's tostring of a number turns big integers into 1e+14.
local fence = redis.call('GET', KEYS[3])
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. fence, 'PX', ARGV[2])
local item = redis.call('HMGET', KEYS[1], 'v', 'd')
return {0, fence, item[1] or '', item[2] or ''}
""",
)

PUT_AND_UNLOCK = Script(
    "put_and_unlock",
    """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return {4} end
local v = vnext(redis.call('HGET', KEYS[1], 'v') or redis.call('GET', KEYS[2]))
if not v then return {5} end
store(KEYS[1], v, ARGV[1], ARGV[2])
redis.call('DEL', KEYS[3])
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
