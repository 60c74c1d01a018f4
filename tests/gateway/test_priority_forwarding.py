"""The tenant's priority decides behind the gateway: a client's own body ``priority`` (which a
tokenmill server would prefer to the tenant header) never reaches the replica."""

from __future__ import annotations

from tests.gateway.helpers import base_config


def test_a_client_body_priority_is_not_forwarded(upstreams, start_gateway):
    (fake, server), _ = upstreams
    config = base_config([server.url])
    config["tenants"][0]["priority"] = 5
    client = start_gateway(config).client()
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"priority": -1000})
    assert "priority" not in fake.bodies[-1]
    assert fake.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]
