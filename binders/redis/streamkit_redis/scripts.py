"""Lua scripts that must run atomically on the server.

Each acts on one stream key, so they also run unchanged on a Redis Cluster.
"""

from __future__ import annotations

__all__ = ["CLAIM_OWN", "DELETE_IDLE_CONSUMER", "OWN_MODES"]

#: What :data:`CLAIM_OWN` does to each entry still owned by the consumer. The
#: delivery count of a pending entry is the binder's attempt counter (1 + failed
#: attempts), so only ``bump`` changes it:
#:
#: ``fetch``   read it, to hand it out (again);
#: ``bump``    count one failed attempt;
#: ``touch``   reset its idle time, so that no other member claims it (lease);
#: ``expire``  make it look idle for ages, so the next claim scan of any member
#:             takes it (a closing subscription gives its entries back).
OWN_MODES = ("fetch", "bump", "touch", "expire")

# XCLAIM with min-idle 0 would take an entry from whoever holds it, so each entry's
# owner is checked first, in the same script, so that no claim can come between.
# RETRYCOUNT sets the delivery count explicitly (XCLAIM would otherwise add one
# unless JUSTID is given, and JUSTID would not return the fields). Reply: one
# {id, fields or false, count} per owned entry; fields are false for an entry that
# was deleted from the stream.
CLAIM_OWN = """
local stream, group, consumer, mode = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local fetch = mode == 'fetch'
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', stream, group, id, id, 1)[1]
  if row and row[2] == consumer then
    local count = row[4]
    if mode == 'bump' then count = count + 1 end
    local args = {'XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', count}
    if mode == 'expire' then
      table.insert(args, 'IDLE')
      table.insert(args, 1000000000000)
    end
    if not fetch then table.insert(args, 'JUSTID') end
    local claimed = redis.call(unpack(args))
    local fields = false
    if fetch and claimed[1] and claimed[1][2] then fields = claimed[1][2] end
    out[#out + 1] = {id, fields, count}
  end
end
return out
"""

# XGROUP DELCONSUMER drops the consumer's pending entries with it; removing a
# consumer only when it holds none keeps them claimable (CASES.md C17).
DELETE_IDLE_CONSUMER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""
