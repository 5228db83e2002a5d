"""Pieces of Lua that several of ragq's Redis scripts share."""

from __future__ import annotations

# Redis's clock, the one clock every API process and worker shares (their own clocks may drift apart).
_NOW = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""


def with_now(body: str) -> str:
    """The script `body` with a `now()` function defined before it: seconds since the epoch by Redis's clock."""
    return _NOW + body
