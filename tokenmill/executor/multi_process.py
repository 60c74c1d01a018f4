"""One worker process per rank, spawned; each step goes to every rank, rank 0's output comes back.

Transport: one duplex pipe per worker carrying pickled plain data (``worker_process.py`` has the
protocol). A step is pickled once and the same bytes go to every rank.

Failure is loud and bounded. While waiting for answers the executor also waits on every worker's
process sentinel, so a worker that dies (killed, OOM-killed, crashed) is noticed at once; one that
raises sends its traceback; one that does not answer within ``worker_step_timeout`` seconds
counts as hung. Any of these raises ``WorkerFailedError`` naming the rank, its pid and what
happened, kills every worker, and leaves the executor failed: the engine dies with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import tempfile
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.distributed.parallel_state import file_rendezvous
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.errors import WorkerFailedError
from tokenmill.executor.executor import Executor
from tokenmill.executor.worker_process import send, worker_main
from tokenmill.models.moe_stats import ExpertLoad
from tokenmill.worker.worker import WorkerInfo

logger = logging.getLogger(__name__)

GRACEFUL_EXIT_SECONDS = 5.0
"""How long ``shutdown`` waits for workers to leave on their own before killing them."""


@dataclass
class WorkerHandle:
    rank: int
    process: BaseProcess
    conn: Connection

    def describe(self) -> str:
        return f"worker rank {self.rank} (pid {self.process.pid})"

    def exit_status(self) -> str:
        self.process.join(1.0)  # reap it, so its exit code is known
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"


class MultiProcessExecutor(Executor):
    def __init__(self, config: EngineConfig, max_model_len: int):
        parallel = config.parallel
        self.world_size = parallel.world_size
        self.step_timeout = parallel.worker_step_timeout
        self.failure: WorkerFailedError | None = None
        self._expert_load: ExpertLoad | None = None
        self.workers: list[WorkerHandle] = []
        self._closed = False
        context = multiprocessing.get_context("spawn")
        # the process group's rendezvous file lives as long as the executor
        self._rendezvous = (tempfile.TemporaryDirectory(prefix="tokenmill-tp-")
                            if self.world_size > 1 else None)
        init_method = (file_rendezvous(self._rendezvous.name) if self._rendezvous else None)
        try:
            for rank in range(self.world_size):
                conn, child_conn = context.Pipe(duplex=True)
                process = context.Process(
                    target=worker_main, name=f"tokenmill-worker-{rank}", daemon=True,
                    args=(config, max_model_len, rank, self.world_size, init_method, child_conn,
                          os.getpid(), logging.getLogger().getEffectiveLevel()))
                process.start()
                child_conn.close()  # ours closed: the worker's end is its only one
                self.workers.append(WorkerHandle(rank, process, conn))
            # killed at exit or when this executor is dropped, whatever else happens
            self._finalizer = weakref.finalize(self, kill_processes,
                                               [w.process for w in self.workers])
            infos: list[WorkerInfo] = self._collect(parallel.worker_start_timeout,
                                                    "while loading the model",
                                                    "worker_start_timeout")
        except BaseException:
            self.shutdown()
            raise
        self.kv_spec = min((info.kv_spec for info in infos), key=lambda spec: spec.num_blocks)
        self.weights = infos[0].weights
        self.worker_pids = [info.pid for info in infos]
        self.worker_infos = infos
        self.weight_bytes = [info.weight_bytes for info in infos]
        self.allreduce = infos[0].allreduce
        logger.info("%d worker process(es) ready (pids %s); KV pool: %d blocks; weights per "
                    "rank: %s MiB", self.world_size, self.worker_pids, self.kv_spec.num_blocks,
                    ", ".join(f"{size / 2**20:.1f}" for size in self.weight_bytes))

    # ------------------------------------------------------------------ Executor
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self._check_not_failed()
        payload = pickle.dumps(("execute", scheduler_output), protocol=pickle.HIGHEST_PROTOCOL)
        for worker in self.workers:
            try:
                worker.conn.send_bytes(payload)
            except OSError:  # its end is closed: it died
                raise self._fail(f"{worker.describe()} {worker.exit_status()} before a step "
                                 "could be sent to it") from None
        output = self._collect(self.step_timeout, "during a step", "worker_step_timeout")[0]
        if output.expert_load is not None:
            self._expert_load = output.expert_load
        return output

    def expert_load(self) -> ExpertLoad | None:
        return self._expert_load

    def check_health(self) -> None:
        self._check_not_failed()
        for worker in self.workers:
            if not worker.process.is_alive():
                raise self._fail(f"{worker.describe()} {worker.exit_status()} while the engine "
                                 "was idle")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self.workers:
            if self.failure is None and worker.process.is_alive():
                try:
                    send(worker.conn, "shutdown", None)
                except OSError:
                    pass
        deadline = time.monotonic() + (0 if self.failure is not None else GRACEFUL_EXIT_SECONDS)
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        kill_processes([w.process for w in self.workers])
        for worker in self.workers:
            worker.conn.close()
        if self._rendezvous is not None:
            self._rendezvous.cleanup()

    # ------------------------------------------------------------------ internals
    def _check_not_failed(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise WorkerFailedError("the executor was shut down; its workers are gone")

    def _fail(self, message: str) -> WorkerFailedError:
        """Record the failure, kill every worker, and return the error to raise."""
        error = WorkerFailedError(f"{message}; the engine cannot continue without it")
        logger.error("%s", error.message)
        self.failure = error
        self.shutdown()
        return error

    def _collect(self, timeout: float, during: str, knob: str) -> list[Any]:
        """One answer from every worker, by rank; raises WorkerFailedError if any dies, raises,
        or the answers are not all in within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        answers: dict[int, Any] = {}
        by_conn = {id(w.conn): w for w in self.workers}
        sentinels = {w.process.sentinel: w for w in self.workers}
        while len(answers) < len(self.workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = next(w for w in self.workers if w.rank not in answers)
                raise self._fail(f"{late.describe()} did not answer {during} within "
                                 f"{timeout:g} s ({knob}); it is taken for hung")
            pending = [w.conn for w in self.workers if w.rank not in answers]
            ready = wait([*pending, *sentinels], remaining)
            for item in ready:  # answers first: a failing worker sends why, then exits
                worker = by_conn.get(id(item)) if isinstance(item, Connection) else None
                if worker is None:
                    continue
                try:
                    kind, body = pickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):
                    raise self._fail(f"{worker.describe()} {worker.exit_status()} "
                                     f"{during}") from None
                if kind == "error":
                    raise self._fail(f"{worker.describe()} failed {during}:\n{body.rstrip()}")
                answers[worker.rank] = body
            for item in ready:
                if isinstance(item, int) and item in sentinels:
                    worker = sentinels[item]
                    raise self._fail(f"{worker.describe()} {worker.exit_status()} {during}")
        return [answers[rank] for rank in range(len(self.workers))]


def kill_processes(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(5.0)

