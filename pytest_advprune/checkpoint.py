"""Untrusted pruned checkpoints in, a plain dense model out.

:func:`read_state_dict` loads a file safely (``torch.load(weights_only=True)`` or safetensors,
never plain pickle) and :func:`fold` turns the formats pruned checkpoints come in into a plain
state_dict whose pruned weights are zeros:

* wrappers ``{'state_dict': ...}``, ``{'net': ...}``, ``{'model': ...}``; ``module.`` prefixes
  (DataParallel);
* ``torch.nn.utils.prune`` re-parametrisation: ``<p>_orig`` + ``<p>_mask`` -> ``<p> = orig * mask``;
  loose mask buffers ``<layer>.mask`` / ``<layer>.weight_mask`` multiplied into the weight;
* HYDRA/HARP/RST score layers: dense ``weight`` + ``popup_scores``; the effective weight is
  ``weight * top-k(|popup_scores|)`` per layer, with k = 1 - sparsity (HYDRA's ``subnet_to_dense``).

Weights stored in fp16/bf16 are widened to float32 (exact: no value becomes zero), and the
zeros are counted on the folded tensors. Every error is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import importlib.util
import pickle
import re
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import AdvPruneError, NonFiniteModel
from .sparsity import keep_mask, n_to_prune

WRAPPER_KEYS = ("state_dict", "net", "model")


class CheckpointError(AdvPruneError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the architecture."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read ``path`` (``.safetensors`` or a torch file) without executing any code in it.

    Raises :class:`CheckpointError` for a missing, empty, truncated, non-checkpoint (e.g. an HTML
    page saved by a failed download) or unsafe file (one whose pickle would import or call code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    head = path.read_bytes()[:512]
    if not head:
        raise CheckpointError(f"checkpoint {path}: the file is empty; download it again")
    if head.lstrip()[:1] == b"<":
        raise CheckpointError(f"checkpoint {path}: this is an HTML/XML page, not a checkpoint (a failed download?); "
                              f"download the file itself again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    if head[8:10] == b'{"':  # safetensors: an 8-byte header length, then the JSON header
        raise CheckpointError(f"checkpoint {path}: this is a safetensors file; rename it to end in .safetensors")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a torch zip archive, or a legacy file's pickle protocol byte
        raise CheckpointError(f"checkpoint {path}: neither a torch checkpoint nor safetensors (it starts with "
                              f"{head[:16]!r}); save it with torch.save(model.state_dict(), path) or safetensors")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message tells the user how to load the file unsafely: never pass it on.
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "Weights only load failed" in text or "REDUCE" in text:
            what = f"it imports {found.group(1)}" if found else "it builds Python objects"
            raise CheckpointError(f"checkpoint {path}: refused, the file holds pickled code or objects "
                                  f"({what}); save a plain state_dict (model.state_dict()) or safetensors") from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: not a torch checkpoint ({first})") from None
    except Exception as exc:  # truncated zip, legacy pickle cut short, random bytes (KeyError from the unpickler), ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt ({type(exc).__name__}: {msg}); "
                              f"download it again") from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        # a wrapper key holding a dict wins, even beside tensor metadata such as {'best_prec1': tensor(51.3)}
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None and not _is_state(obj):
            keys = ", ".join(sorted(map(str, obj))[:8])
            raise CheckpointError(f"checkpoint {path}: no state_dict found (top-level keys: {keys}); expected "
                                  f"a state_dict or one under 'state_dict', 'net' or 'model'")
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not _is_state(obj):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state_dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state(d: dict) -> bool:
    return bool(d) and any(isinstance(v, torch.Tensor) for v in d.values()) and all(isinstance(k, str) for k in d)


def fold(state: dict[str, torch.Tensor], sparsity: float | None = None) -> dict[str, torch.Tensor]:
    """Fold pruning re-parametrisations into plain weights with zeros (see module docstring).

    ``sparsity`` (fraction) is the k of score layers: each ``popup_scores`` keeps the top
    ``1 - sparsity`` of its layer. Raises :class:`CheckpointError` if score layers are present
    and ``sparsity`` is None. Floating tensors come back as float32.
    """
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_mask") or key.endswith(".popup_scores") or key.endswith(".mask"):
            continue
        if key.endswith("_orig"):
            base = key[: -len("_orig")]
            mask = state.get(base + "_mask")
            out[base] = value * mask.to(value.dtype) if mask is not None else value
            continue
        out[key] = value
    for key in state:
        prefix = key.rsplit(".", 1)[0]
        if key.endswith(".mask") and prefix + ".weight" in out:
            out[prefix + ".weight"] = out[prefix + ".weight"] * state[key].to(out[prefix + ".weight"].dtype)
        if key.endswith(".weight_mask") and prefix + ".weight" in out and prefix + ".weight_orig" not in state:
            out[prefix + ".weight"] = out[prefix + ".weight"] * state[key].to(out[prefix + ".weight"].dtype)
        if key.endswith(".popup_scores"):
            if sparsity is None:
                raise CheckpointError("checkpoint has HYDRA-style popup_scores; pass --advprune-sparsity so the "
                                      "top-k of each layer's scores can be applied")
            scores = state[key]
            keep = keep_mask(scores.float().abs(), n_to_prune(scores.numel(), sparsity))
            out[prefix + ".weight"] = out[prefix + ".weight"] * keep.to(out[prefix + ".weight"].dtype)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}


def check_finite_state(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise :class:`NonFiniteModel` naming the first tensor with NaN or inf."""
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise NonFiniteModel(f"checkpoint {path}: tensor {k!r} holds NaN or inf values; it cannot be evaluated")


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading strictly where ``own`` (a model's state_dict) loads: the first
    missing and unexpected keys and shape mismatches, in one line; empty when it fits."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{what} {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    return "; ".join(parts)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Strictly load ``state`` into ``model``; a mismatch raises :class:`CheckpointError` naming ``path``
    and listing the first missing and unexpected keys and shape mismatches (never a partly random model)."""
    own = model.state_dict()
    problem = state_mismatch(own, state)
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit the architecture: {problem}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model


class FirstOutput(nn.Module):
    """Wraps a model whose forward returns a tuple/list (e.g. logits and features): keeps element 0."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def user_architecture(spec: str) -> type[nn.Module]:
    """``path/to/file.py:ClassName`` -> the class; raises :class:`CheckpointError` if absent."""
    file, _, name = spec.rpartition(":")
    if not file:
        raise CheckpointError(f"--advprune-arch={spec}: expected a registered name or path/to/file.py:ClassName")
    if not Path(file).is_file():
        raise CheckpointError(f"--advprune-arch={spec}: no such file {file}; give the path of the Python file that "
                              "defines the class, then :ClassName")
    mod_spec = importlib.util.spec_from_file_location(f"advprune_user_arch_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    mod_spec.loader.exec_module(module)
    cls = getattr(module, name, None)
    if cls is None:
        raise CheckpointError(f"--advprune-arch={spec}: {file} defines no {name}")
    return cls
