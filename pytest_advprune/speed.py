"""Device-dependent speed settings of the training and evaluation engines, in one place.

On CUDA (switched on by the device type, never by a preset, so the protocol is the same on every
device): channels_last memory format for conv models, bf16 autocast for training steps (fp32
master weights; the inner attack runs under it too), fused SGD, cuDNN autotuning, and
``torch.compile`` with a one-line warning and eager fallback when compilation fails.
Evaluation attacks never run below the default precision (fp32, cuDNN convolutions in TF32).

On the CPU nothing here changes a number: the loops run the same ops, in the same order and
dtype, as before these settings existed (``tests/test_speed.py`` checks trained parameters bit
for bit against the earlier loop). The CPU thread count changes CPU results, so it is left alone
unless ``ADVPRUNE_THREADS`` asks (:func:`configure_threads`).

``ADVPRUNE_COMPILE``: ``auto`` (default; compile on CUDA), ``0`` (never), ``1`` (also on the CPU).
``ADVPRUNE_THREADS``: unset (default; torch's thread count), ``auto`` (cores / xdist workers), or N.
"""

from __future__ import annotations

import contextlib
import copy
import os
import resource
import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import BadOption

COMPILE_ENV = "ADVPRUNE_COMPILE"
THREADS_ENV = "ADVPRUNE_THREADS"
_DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, before anyone changes it


@dataclass(frozen=True)
class FastPath:
    """Which speed features a loop uses. ``autocast``: the dtype of the training step's autocast
    region, or None for none. Build it with :meth:`for_device`; tests and benchmarks pass their own."""

    channels_last: bool = False
    autocast: torch.dtype | None = None
    fused_sgd: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str) -> "FastPath":
        """Everything on for CUDA (bf16 only where the GPU has it natively), nothing on for the CPU
        (compile only if ``ADVPRUNE_COMPILE=1``). Raises :class:`~pytest_advprune.errors.BadOption`
        for a bad ``ADVPRUNE_COMPILE``."""
        cuda = torch.device(device).type == "cuda"
        return cls(
            channels_last=cuda,
            autocast=torch.bfloat16 if cuda and _native_bf16() else None,
            fused_sgd=cuda,
            compile=compile_wanted(cuda),
            cudnn_benchmark=cuda,
        )

    def for_eval(self) -> "FastPath":
        """The same settings without autocast: attacks run at the default precision."""
        return replace(self, autocast=None)

    def autocast_region(self, device: torch.device) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to :attr:`autocast` on ``device``, or a no-op context."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def _native_bf16() -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.is_bf16_supported()


def compile_wanted(cuda: bool) -> bool:
    """Read ``ADVPRUNE_COMPILE`` (see module docstring). Raises :class:`~pytest_advprune.errors.BadOption`
    naming the accepted values."""
    value = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if value in ("auto", ""):
        return cuda
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    raise BadOption(f"{COMPILE_ENV}={value!r}: use auto, 0 or 1")


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def compilable(model: nn.Module) -> bool:
    """False for models with parametrised weights (score masks, twin masks): their mask caches are
    Python state that compiled graphs would guard on and recompile for at every update."""
    return not any(parametrize.is_parametrized(m) for m in model.modules())


def warn_fallback(what: str, exc: BaseException) -> None:
    """The one-line warning of a failed ``torch.compile``; the caller continues in eager mode."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    warnings.warn(f"torch.compile failed for {what} ({type(exc).__name__}: {first[:200]}); running eagerly",
                  RuntimeWarning, stacklevel=3)


def compile_in_place(model: nn.Module) -> None:
    """Compile ``model``'s forward in place (``nn.Module.compile``): parameter names, hooks and the
    module object stay the same, so methods' callbacks see the model they built."""
    model.compile()


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_in_place` (``nn.Module.compile`` keeps the compiled call in this attribute)."""
    model._compiled_call_impl = None


def prepare_for_eval(model: nn.Module, device: torch.device, probe: torch.Tensor | None = None,
                     fast: FastPath | None = None) -> nn.Module:
    """The model the attacks should call: on ``device``, in eval mode, and on CUDA a channels_last
    copy (the caller's model is left as it is), compiled when ``probe`` (a batch ``[B, C, H, W]``)
    passes a forward and an input gradient through the compiled model; otherwise eager, with a
    one-line warning. On the CPU (default settings) it is ``model`` itself, so results are unchanged.
    """
    fast = (fast or FastPath.for_device(device)).for_eval()
    model = model.to(device).eval()
    if fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if fast.channels_last and has_conv(model):
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if not (fast.compile and compilable(model)):
        return model
    compiled = torch.compile(model)
    if probe is not None:
        try:
            x = probe.to(device).requires_grad_(True)
            torch.autograd.grad(compiled(x).sum(), x)
        except Exception as exc:  # any compiler failure: the eager model gives the same attacks
            warn_fallback("the evaluated model", exc)
            return model
    return compiled


def configure_threads(environ: dict[str, str] | None = None) -> int:
    """Apply ``ADVPRUNE_THREADS`` to this process's CPU thread count and return the count in use.

    CPU results depend on the thread count (reductions split differently: the smoke dense model
    trained with 1 and with 2 threads differs), so by default nothing changes and a run keeps
    torch's default (``OMP_NUM_THREADS`` if set, else the cores torch found). ``ADVPRUNE_THREADS``:
    a positive integer sets that count; ``auto`` shares the cores among pytest-xdist workers
    (torch's default divided by ``PYTEST_XDIST_WORKER_COUNT``, at least 1; ``OMP_NUM_THREADS``
    wins when set), trading bit-identity with single-process runs for no oversubscription.
    Raises :class:`~pytest_advprune.errors.BadOption` for any other value.
    """
    env = os.environ if environ is None else environ
    value = env.get(THREADS_ENV, "").strip().lower()
    if value == "":
        return torch.get_num_threads()
    if value == "auto":
        if env.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        try:
            workers = max(1, int(env.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        except ValueError:
            workers = 1
        threads = max(1, _DEFAULT_THREADS // workers)
    elif value.isdigit() and int(value) > 0:
        threads = int(value)
    else:
        raise BadOption(f"{THREADS_ENV}={value!r}: use a positive integer or auto (unset keeps torch's default)")
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so wall-clock timings measure it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA's ``max_memory_allocated`` on ``device`` (since its last reset), on
    CPU the process's peak resident set size so far (Linux ``ru_maxrss``, KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
