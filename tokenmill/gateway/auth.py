"""Auth stage: API key → tenant (401 otherwise), and the tenant's model allow-list (403).

Keys live in the config only as sha256 hashes. A plain unsalted hash is enough here because the
keys are 256-bit random strings we generate: nobody can guess or dictionary-attack them, so the
slow salted hashes passwords need would only add latency to every request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets

from tokenmill.errors import AuthenticationError, PermissionDeniedError
from tokenmill.gateway.config import TenantSection
from tokenmill.gateway.pipeline import GatewayRequest, GatewayResponse, Handler

KEY_PREFIX = "tm-"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def can_use_model(tenant: TenantSection, model: str) -> bool:
    return any(fnmatch.fnmatchcase(model, pattern) for pattern in tenant.models)


class AuthStage:
    name = "auth"

    def __init__(self, tenants: list[TenantSection]) -> None:
        self._entries = [(h.encode(), t) for t in tenants for h in t.api_key_hashes]

    def tenant_for(self, api_key: str | None) -> TenantSection:
        if not api_key:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        presented = hash_api_key(api_key).encode()
        found = None
        # Compare against every entry in constant time, without stopping at the first match, so
        # the time taken says nothing about which (or how many) keys exist.
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, presented):
                found = tenant
        if found is None:
            raise AuthenticationError("invalid API key")
        return found

    async def __call__(self, request: GatewayRequest, call_next: Handler) -> GatewayResponse:
        if request.tenant is None:  # the app may have authenticated already, before the body
            request.tenant = self.tenant_for(request.api_key)
        model = request.body.get("model")
        if isinstance(model, str) and not can_use_model(request.tenant, model):
            raise PermissionDeniedError(f"tenant {request.tenant.name!r} may not use model "
                                        f"{model!r}", param="model", code="model_not_allowed")
        return await call_next(request)
