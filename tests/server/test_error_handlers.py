"""error_handlers turns pydantic error locations into the parameter names clients wrote."""

from __future__ import annotations

import pytest

from tokenmill.server.error_handlers import param_path


@pytest.mark.parametrize(("loc", "param"), [
    (("body", "messages", 0, "content"), "messages[0].content"),
    (("body", "prompt", "function-after[_check_prompt(), any]"), "prompt"),
    (("query", "since"), "since"),
    (("path", "request_id"), "request_id"),
    (("header", "x-tokenmill-tenant"), "x-tokenmill-tenant"),
    (("body",), None),
    (("body", "stream_options", "include_usage"), "stream_options.include_usage"),
])
def test_param_path_names_the_field_without_its_source(loc, param):
    assert param_path(loc) == param
