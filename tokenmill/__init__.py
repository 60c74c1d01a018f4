"""tokenmill: a self-hosted LLM inference stack."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.native_caches import bound_native_caches

bound_native_caches()  # before anything imports torch (see native_caches.py)

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.llm import LLM

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch; importing it lazily keeps `tokenmill --help` and the gateway light.
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(name)
