"""Test-only fault injection: make a classification slow, hang, crash its worker or run out of GPU
memory on purpose, so that tests/faults can prove what happens then with real processes.

Driven by ``DERMQ_FAULT_INJECTION`` (JSON, see :class:`core.config.FaultInjection`), which Settings
refuses unless ``DERMQ_ENVIRONMENT=test``; the hook checks the environment again, so no production
worker can ever act on it. One hook, called just before the primary predictor's inference:

- ``sleep_before_inference``: sleep that long (soft and hard time limits);
- ``ignore_soft_limit``: block Celery's soft-limit signal (SIGUSR1) during that sleep, like native
  code that never returns to Python, so that only the hard limit (the child is killed) ends it;
- ``exit_during_inference``: ``os._exit`` the worker child (a poison case);
- ``cuda_oom_times``: raise ``torch.OutOfMemoryError`` on the first N inferences of the process;
- ``attempts``: apply the above only on these attempt numbers (counted in Postgres at each claim,
  so they survive the death of the process that made them).
"""

from __future__ import annotations

import logging
import os
import signal
import time

from core.config import Settings

log = logging.getLogger("dermq.worker.faults")
_ooms_raised = 0


def before_inference(settings: Settings, attempt: int) -> None:
    global _ooms_raised
    faults = settings.fault_injection
    if faults is None or settings.environment != "test":
        return
    if faults.attempts is not None and attempt not in faults.attempts:
        return
    if faults.exit_during_inference:
        log.warning("fault injection: the worker child exits now", extra={"event": "fault_exit", "attempt": attempt})
        logging.shutdown()
        os._exit(70)
    if faults.sleep_before_inference:
        log.warning(
            "fault injection: sleeping before inference",
            extra={"event": "fault_sleep", "seconds": faults.sleep_before_inference, "attempt": attempt},
        )
        if faults.ignore_soft_limit:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            try:
                time.sleep(faults.sleep_before_inference)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        else:
            time.sleep(faults.sleep_before_inference)
    if _ooms_raised < faults.cuda_oom_times:
        _ooms_raised += 1
        import torch

        log.warning("fault injection: CUDA out of memory", extra={"event": "fault_oom", "attempt": attempt})
        raise torch.OutOfMemoryError("CUDA out of memory (injected by DERMQ_FAULT_INJECTION)")
