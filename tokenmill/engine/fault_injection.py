"""Test hooks: make the engine thread or a model worker fail on purpose, to prove nobody is left
waiting.

``StepFaultInjector`` (the ``--inject-*`` server options) slows every step by a factor or fails a
share of them.

``TOKENMILL_INJECT_ENGINE_FAULT_AT_STEP=N`` makes the engine thread raise ``InjectedEngineFault``
(a ``RuntimeError``, not one of tokenmill's own errors) just before its N-th step, once per process
(steps are counted across engines), so a server run with ``--restart-engine-on-failure`` comes
back and keeps serving. Unset, the default, it costs one comparison per step.

``TOKENMILL_INJECT_WORKER_FAULT_AT_STEP=N`` does the same inside the model worker (in the engine's
process, or in a worker process of the multi-process executor) at its N-th ``execute``;
``N:hang`` makes that worker stop answering instead (sleeps for ever), to exercise the executor's
step timeout.
"""

from __future__ import annotations

import os
import random
import threading
import time

from tokenmill.errors import ConfigError

FAULT_STEP_ENV = "TOKENMILL_INJECT_ENGINE_FAULT_AT_STEP"
WORKER_FAULT_STEP_ENV = "TOKENMILL_INJECT_WORKER_FAULT_AT_STEP"


class InjectedEngineFault(RuntimeError):
    """Raised by the hook; never raised unless asked for."""


class EngineFaultInjector:
    def __init__(self, fail_at_step: int | None):
        self.fail_at_step = fail_at_step
        self.num_steps = 0
        self.fired = False
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> EngineFaultInjector:
        """The process's injector (one, shared by every engine, so the fault fires once)."""
        global _from_env
        with _env_lock:
            if _from_env is None:
                raw = os.environ.get(FAULT_STEP_ENV, "").strip()
                _from_env = cls(int(raw) if raw else None)
            return _from_env

    def before_step(self) -> None:
        if self.fail_at_step is None:
            return
        with self._lock:
            self.num_steps += 1
            if self.fired or self.num_steps < self.fail_at_step:
                return
            self.fired = True
        raise InjectedEngineFault(f"fault injected before engine step {self.fail_at_step}")


class WorkerFaultInjector:
    """The worker side: one per worker, counting its ``execute`` calls."""

    def __init__(self, fail_at_step: int | None, hang: bool = False):
        self.fail_at_step = fail_at_step
        self.hang = hang
        self.num_steps = 0

    @classmethod
    def from_env(cls) -> WorkerFaultInjector:
        raw = os.environ.get(WORKER_FAULT_STEP_ENV, "").strip()
        if not raw:
            return cls(None)
        step, _, mode = raw.partition(":")
        return cls(int(step), hang=mode == "hang")

    def before_execute(self) -> None:
        if self.fail_at_step is None:
            return
        self.num_steps += 1
        if self.num_steps != self.fail_at_step:
            return
        if self.hang:
            while True:  # a worker that stops answering; only its executor's timeout ends this
                time.sleep(3600)
        raise InjectedEngineFault(f"fault injected in the model worker at step "
                                  f"{self.fail_at_step}")


_env_lock = threading.Lock()
_from_env: EngineFaultInjector | None = None


class StepFaultInjector:
    """``tokenmill serve --inject-step-delay-factor F --inject-failure-rate P``: for drills and
    tests of the straggler and failover paths on real replicas.

    After each engine step it sleeps ``(F - 1) x`` the step's own time, so the engine looks like
    one on hardware F times slower (the step time it reports includes the delay); before each
    step it fails with probability P (raising ``InjectedEngineFault``: the engine dies and its
    server or replica is replaced). Both off by default, which costs two comparisons per step."""

    def __init__(self, delay_factor: float = 1.0, failure_rate: float = 0.0,
                 seed: int | None = None):
        if not delay_factor >= 1.0:
            raise ConfigError(f"inject_step_delay_factor={delay_factor} must be >= 1 (1 = no "
                              "delay)", param="inject_step_delay_factor")
        if not 0.0 <= failure_rate <= 1.0:
            raise ConfigError(f"inject_failure_rate={failure_rate} must be in [0, 1]",
                              param="inject_failure_rate")
        self.delay_factor = delay_factor
        self.failure_rate = failure_rate
        self._random = random.Random(seed)

    @property
    def is_active(self) -> bool:
        return self.delay_factor > 1.0 or self.failure_rate > 0.0

    def before_step(self) -> None:
        if self.failure_rate and self._random.random() < self.failure_rate:
            raise InjectedEngineFault(f"failure injected before an engine step "
                                      f"(inject_failure_rate={self.failure_rate})")

    def after_step(self, step_seconds: float) -> None:
        if self.delay_factor > 1.0:
            time.sleep(step_seconds * (self.delay_factor - 1.0))
