"""Content-addressed, atomic artefact cache (models as safetensors, results as JSON).

An entry's key is the sha256 of a JSON description of everything that affects it (preset
fields, architecture, seed, method source, engine version); its files are
``<root>/<kind>/<key>.safetensors`` / ``.json``. Every write goes to a temporary file in the
same folder and is renamed into place, so a reader never sees half a file. Each entry stores
the sha256 of its payload; an entry whose bytes do not match, or that fails to parse, is
reported, deleted and rebuilt, never trusted. A file lock per entry stops two processes (e.g.
pytest-xdist workers) from building the same entry twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

from .files import atomic_write_bytes

# Bump when training/pruning/evaluation code changes results, so old cache entries are not reused.
ENGINE_VERSION = "1"


def default_dir() -> Path:
    """The cache folder when none is given: env ``ADVPRUNE_CACHE_DIR``, else ``~/.cache/pytest-advprune``.
    One definition, so the plugin and the benchmark scripts read and write the same cache."""
    return Path(os.environ.get("ADVPRUNE_CACHE_DIR") or Path.home() / ".cache" / "pytest-advprune")


def digest(description: dict[str, Any]) -> str:
    """Cache key: sha256 (hex, 24 chars) of the canonical JSON of ``description``."""
    blob = json.dumps({"engine": ENGINE_VERSION, "description": description}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 (hex, 64 chars) of ``model``'s state_dict tensor bytes, in state_dict order: the
    identity of a model's weights in cache keys and benchmark records."""
    return hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()


class Cache:
    """Artefacts under ``root``; ``log`` receives one line per rebuilt corrupt entry."""

    def __init__(self, root: str | os.PathLike, log: Callable[[str], None] = lambda s: None):
        self.root = Path(root)
        self.log = log

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        base = self.root / kind / key
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def has(self, kind: str, key: str) -> bool:
        """Whether the entry's files exist (without reading or verifying them, and without creating anything)."""
        return self._paths(kind, key)[1].exists()

    def lock(self, kind: str, key: str) -> FileLock:
        path = self.root / kind / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def _discard(self, kind: str, key: str, why: str) -> None:
        self.log(f"cache: {kind}/{key} is corrupt ({why}); deleting and rebuilding it")
        for p in self._paths(kind, key):
            p.unlink(missing_ok=True)

    # ---------------------------------------------------------------- JSON entries

    def load_json(self, kind: str, key: str) -> Any | None:
        """The stored object, or None if absent or corrupt (corrupt entries are deleted)."""
        _, meta = self._paths(kind, key)
        if not meta.exists():
            return None
        try:
            wrapper = json.loads(meta.read_text())
            payload = wrapper["payload"]
            blob = json.dumps(payload, sort_keys=True).encode()
            if hashlib.sha256(blob).hexdigest() != wrapper["sha256"]:
                raise ValueError("checksum mismatch")
            return payload
        except (ValueError, KeyError, TypeError) as exc:
            self._discard(kind, key, f"{type(exc).__name__}: {exc}")
            return None

    def save_json(self, kind: str, key: str, payload: Any) -> None:
        blob = json.dumps(payload, sort_keys=True).encode()
        wrapper = {"sha256": hashlib.sha256(blob).hexdigest(), "payload": payload}
        atomic_write_bytes(self._paths(kind, key)[1], json.dumps(wrapper, sort_keys=True).encode())

    # ---------------------------------------------------------------- model entries

    def load_state(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(state_dict, meta)`` or None if absent or corrupt (corrupt entries are deleted)."""
        from safetensors.torch import load

        tensors, meta = self._paths(kind, key)
        if not tensors.exists() and not meta.exists():
            return None
        info = self.load_json(kind, key)
        try:
            if info is None or not tensors.exists():
                raise ValueError("tensor file or metadata missing")
            data = tensors.read_bytes()
            if hashlib.sha256(data).hexdigest() != info["tensors_sha256"]:
                raise ValueError("checksum mismatch")
            return load(data), info["meta"]
        except Exception as exc:  # safetensors raises its own error types on garbage
            self._discard(kind, key, f"{type(exc).__name__}: {exc}")
            return None

    def save_state(self, kind: str, key: str, state: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
        atomic_write_bytes(self._paths(kind, key)[0], data)
        self.save_json(kind, key, {"tensors_sha256": hashlib.sha256(data).hexdigest(), "meta": meta})

    def state(
        self, kind: str, key: str, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
    ) -> tuple[dict[str, torch.Tensor], dict, bool]:
        """Load the entry or build and store it under the entry's lock. Returns ``(state, meta, was_cached)``."""
        with self.lock(kind, key):
            hit = self.load_state(kind, key)
            if hit is not None:
                return hit[0], hit[1], True
            state, meta = build()
            self.save_state(kind, key, state, meta)
            return state, meta, False

    def json(self, kind: str, key: str, build: Callable[[], Any]) -> tuple[Any, bool]:
        """Load the JSON entry or build and store it under the entry's lock. Returns ``(payload, was_cached)``."""
        with self.lock(kind, key):
            hit = self.load_json(kind, key)
            if hit is not None:
                return hit, True
            payload = build()
            self.save_json(kind, key, payload)
            return payload, False
