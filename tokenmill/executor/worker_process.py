"""The body of one worker process of ``MultiProcessExecutor``: load the model, answer steps.

Protocol over one duplex pipe, each message a pickled ``(kind, body)`` tuple of plain data:

    worker -> engine   ("ready", WorkerInfo)            once, after the model loaded
    engine -> worker   ("execute", SchedulerOutput)     each step
    worker -> engine   ("output", RunnerOutput | None)  rank 0 sends its output (with an MoE
                                                    model's routing counts), others None
    engine -> worker   ("shutdown", None)               leave the loop and exit
    worker -> engine   ("error", traceback text)        then the worker exits

A worker never outlives the engine: the kernel kills it when the thread that spawned it (the
engine thread) ends (``PR_SET_PDEATHSIG``), a watcher thread exits it if its parent process is
gone anyway, and end-of-file on its pipe ends it too. It ignores Ctrl+C and SIGTERM: a terminal
sends Ctrl+C to the whole process group, and `kill -TERM -PGID` (or a supervisor that signals the
group) would otherwise kill the workers before the server has drained its running requests. The
engine's process decides when workers stop; if it dies, the parent-death signal (SIGKILL) still
ends them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from tokenmill.config import EngineConfig

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0


def send(conn: Connection, kind: str, body: Any) -> None:
    conn.send_bytes(pickle.dumps((kind, body), protocol=pickle.HIGHEST_PROTOCOL))


def worker_main(config: EngineConfig, max_model_len: int, rank: int, world_size: int,
                init_method: str | None, conn: Connection, parent_pid: int,
                log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch_parent(parent_pid, f"tm-worker-{rank}")
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s")
    from tokenmill.worker.worker import Worker  # after the watch: importing torch takes seconds

    try:
        worker = Worker(config, max_model_len, rank=rank, world_size=world_size,
                        distributed_init_method=init_method)
        send(conn, "ready", worker.info())
    except BaseException:  # noqa: BLE001 - reported to the engine, which fails loudly
        send(conn, "error", traceback.format_exc())
        return
    try:
        serve_steps(worker, conn)
    finally:
        worker.shutdown()


def serve_steps(worker: Any, conn: Connection) -> None:
    while True:
        try:
            kind, body = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the engine is gone
        if kind == "shutdown":
            return
        assert kind == "execute", kind
        try:
            output = worker.execute(body)
        except BaseException:  # noqa: BLE001 - reported; the engine declares itself dead
            send(conn, "error", traceback.format_exc())
            return
        if worker.rank == 0:
            output.expert_load = worker.runner.expert_load()  # None for a dense model
            send(conn, "output", output)
        else:
            send(conn, "output", None)


def watch_parent(parent_pid: int, name: str) -> None:
    """Die with the parent: the kernel's parent-death signal where there is one (Linux), and a
    polling thread everywhere (it also covers a parent that died before the signal was set)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)  # what ps and psutil show
    except (OSError, AttributeError):
        pass  # not Linux: the thread below does it
    if os.getppid() != parent_pid:
        os._exit(1)

    def poll() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()
