"""One log line per finished request, and the start-up banner.

The per-request line comes from an engine output listener, so it is written when the engine
finishes the request (whatever the HTTP side does) with the engine's own timestamps. With request
tracing on it ends with the trace's one-phrase summary ("trace: queued 1.8 s: KV full behind 12
requests; preempted once").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.trace_store import TraceStore

logger = logging.getLogger("tokenmill.server.requests")


def log_finished_requests(outputs: list[RequestOutput], now: float,
                          traces: TraceStore | None = None) -> None:
    for output in outputs:
        if not output.finished:
            continue
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        stats = output.metrics[0] if output.metrics else None
        ttfts = [s.time_to_first_token for s in output.metrics if s.time_to_first_token]
        ttft = f"{min(ttfts):.3f}s" if ttfts else "-"
        total = f"{now - stats.arrival_time:.3f}s" if stats else "-"
        reasons = ",".join(sorted({c.finish_reason or "?" for c in output.outputs}))
        summary = traces.summary(output.request_id, now) if traces is not None else None
        logger.info("request %s finished: prompt %d tokens (%d cached), generated %d tokens "
                    "in %d choice(s), ttft %s, total %s, finish %s%s", output.request_id,
                    len(output.prompt_token_ids), output.num_cached_tokens, num_generated,
                    len(output.outputs), ttft, total, reasons,
                    f"; trace: {summary}" if summary else "")


def finished_request_logger(traces: TraceStore
                            ) -> Callable[[list[RequestOutput], float], None]:
    """The output listener that logs finished requests with their trace summaries."""
    def listener(outputs: list[RequestOutput], now: float) -> None:
        log_finished_requests(outputs, now, traces)
    return listener


def log_aborted_request(request_id: str, reason: str) -> None:
    logger.info("request %s aborted: %s", request_id, reason)


def banner(info: dict[str, Any], address: str, num_threads: int) -> str:
    mib = info["kv_bytes"] / 2**20
    ranks = info.get("tensor_parallel_size", 1)
    parallel = ""
    if ranks > 1:
        parallel = (f", tensor parallel over {ranks} ranks (all-reduce {info['allreduce']}): "
                    f"each rank holds {info['weight_bytes_per_rank'] / 2**20:.1f} MiB of "
                    f"weights and {mib:.0f} MiB of KV cache")
    return (f"tokenmill serve: model {info['model']} ({info['path']}), weights "
            f"{info['weights']}, activations {info['dtype']} on "
            f"{info['device']} with {num_threads} threads, context {info['max_model_len']} "
            f"tokens, KV pool {info['kv_blocks']} blocks = {info['kv_tokens']} tokens "
            f"({mib:.0f} MiB{' per rank' if ranks > 1 else ''}){parallel}; "
            f"listening on {address}")
