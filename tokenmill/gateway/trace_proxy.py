"""``GET /v1/requests/{id}/trace`` through the gateway: a tenant reads its own requests' traces.

The gateway does not remember which replica served a request, so it asks each replica in turn,
passing the caller's tenant in ``x-tokenmill-tenant``; a server answers only for requests of that
tenant (``tokenmill/server/trace_routes.py``), so one tenant can never read another's trace, and an
id no replica knows for this tenant is a 404. Replicas are few, and a trace is read by a person
looking into one slow request, so asking them one by one costs nothing that matters.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from tokenmill.errors import NotFoundError
from tokenmill.gateway.router import Router

TRACE_TIMEOUT_S = 5.0


async def fetch_trace(router: Router, client: httpx.AsyncClient, request_id: str,
                      tenant_name: str) -> dict[str, Any]:
    path = f"/v1/requests/{quote(request_id, safe='')}/trace"
    for replica in router.replicas:
        try:
            response = await client.get(replica.url + path, timeout=TRACE_TIMEOUT_S,
                                        headers={"x-tokenmill-tenant": tenant_name})
        except httpx.TransportError:
            continue  # a replica that is down holds no trace we can show
        if response.status_code == 200:
            return response.json()
    raise NotFoundError(f"no request {request_id!r} of yours is known to any upstream (a trace "
                        "is kept for a bounded time after its request finishes)",
                        param="request_id")
