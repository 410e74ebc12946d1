"""Runs split over pytest-xdist workers: which GPU each worker uses (no pytest imports).

The other parts of a multi-process run live where their data does: the dense-model cache builds
every entry under a per-entry file lock (:class:`~pytest_advprune.cache.Cache`), so the first
process builds it and the others wait and load it; records of one cell from several workers are
joined by :func:`~pytest_advprune.report.combine`; the report is written once, under a file lock.
"""

from __future__ import annotations

import re

_WORKER = re.compile(r"gw(\d+)")


def worker_index(worker: str | None) -> int | None:
    """The number K of a pytest-xdist worker id ``gwK``; None for the main process or another id."""
    match = _WORKER.fullmatch(worker or "")
    return int(match.group(1)) if match else None


def worker_device(requested: str, worker: str | None, cuda_count: int) -> str:
    """The device a process should use for ``--advprune-device=requested``.

    Worker ``gwK`` asking for ``auto`` or ``cuda`` gets ``cuda:{K mod cuda_count}`` when there is
    at least one CUDA device, so ``pytest -n <gpus>`` puts one worker on each GPU. Everything else
    is returned unchanged: an explicit ``cuda:N`` or ``cpu`` is respected, the main process (no
    worker id) resolves ``auto``/``cuda`` itself, and ``cuda`` without a device is left for
    :meth:`~pytest_advprune.session.RunConfig.torch_device` to refuse with its one-line error.
    """
    k = worker_index(worker)
    if requested in ("auto", "cuda") and k is not None and cuda_count > 0:
        return f"cuda:{k % cuda_count}"
    return requested
