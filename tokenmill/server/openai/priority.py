"""A request's scheduling priority: the body's ``priority`` (vLLM's field), else the gateway's
tenant priority header, mapped explicitly because the two count in opposite directions.

* ``priority`` in the body follows vLLM: an integer, default 0, LOWER is more urgent.
* ``x-tokenmill-priority`` is the gateway's tenant ``priority`` (``gateway/config.py``), where
  HIGHER is more important. The engine priority is its negation: tenant priority 5 becomes engine
  priority -5, ahead of the default 0.

The body wins when it names a priority. The gateway drops a client's body ``priority`` before
forwarding (``gateway/upstream.py``), so behind the gateway the tenant's priority always decides.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokenmill.errors import InvalidRequestError

PRIORITY_HEADER = "x-tokenmill-priority"
"""Set by the gateway: the tenant's priority, higher is more important."""

PRIORITY_LIMIT = 2**31 - 1
"""Largest priority magnitude taken (a 32-bit int, as elsewhere): beyond it a value is a mistake."""


def request_priority(body_priority: int | None, headers: Mapping[str, str]) -> int:
    """The engine priority (lower = more urgent) of one HTTP request."""
    if body_priority is not None:
        return _checked(body_priority, "priority")
    raw = headers.get(PRIORITY_HEADER)
    if raw is None:
        return 0
    try:
        tenant_priority = int(raw.strip())
    except ValueError:
        raise InvalidRequestError(f"the {PRIORITY_HEADER} header must be an integer (higher is "
                                  f"more important), not {raw!r}", param=PRIORITY_HEADER) from None
    return -_checked(tenant_priority, PRIORITY_HEADER)


def _checked(value: int, name: str) -> int:
    if not -PRIORITY_LIMIT <= value <= PRIORITY_LIMIT:
        raise InvalidRequestError(f"{name}={value} is out of range; use an integer between "
                                  f"{-PRIORITY_LIMIT} and {PRIORITY_LIMIT}", param=name)
    return value
