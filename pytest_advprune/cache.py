"""Content-addressed, atomic artefact cache (models as safetensors, results as JSON).

An entry's key is the sha256 of a JSON description of everything that affects it (preset
fields, architecture, seed, the code that builds it (:func:`code_digest`), engine version); its files are
``<root>/<kind>/<key>.safetensors`` / ``.json``. Every write goes to a temporary file in the
same folder and is renamed into place, so a reader never sees half a file. Each entry stores
the sha256 of its payload; an entry whose bytes do not match, or that fails to parse, is
reported, deleted and rebuilt, never trusted. A file lock per entry stops two processes (e.g.
pytest-xdist workers) from building the same entry twice.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from filelock import FileLock

from .files import atomic_write_bytes

# Bump when code that no cache key digests changes results (the build steps in session.py, a
# library's behaviour), so old entries are not reused; it also separates report protocols.
ENGINE_VERSION = "1"

PACKAGE = "pytest_advprune"
# Package modules left out of code digests: their values enter keys as data (preset fields via
# ``Preset.fingerprint``) or they cannot change a result (error messages, method registration).
NOT_RESULT_CODE = frozenset({f"{PACKAGE}.presets", f"{PACKAGE}.errors", f"{PACKAGE}.registry"})


def default_dir() -> Path:
    """The cache folder when none is given: env ``ADVPRUNE_CACHE_DIR``, else ``~/.cache/pytest-advprune``.
    One definition, so the plugin and the benchmark scripts read and write the same cache."""
    return Path(os.environ.get("ADVPRUNE_CACHE_DIR") or Path.home() / ".cache" / "pytest-advprune")


def digest(description: dict[str, Any]) -> str:
    """Cache key: sha256 (hex, 24 chars) of the canonical JSON of ``description``."""
    blob = json.dumps({"engine": ENGINE_VERSION, "description": description}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def code_digest(*roots: str) -> str:
    """sha256 (hex, 16 chars) of the code of the modules named in ``roots`` and of every module they
    import, transitively, from this package or from a root's own top-level package (a user method's
    sibling files, a plugin package's helpers): static ``import``/``from`` statements, relative or
    absolute, inside functions too, not under ``if TYPE_CHECKING:``; :data:`NOT_RESULT_CODE`
    excepted. Each module enters as :func:`normalized_code`, so editing a comment, a docstring or a
    ``known_failures`` declaration keeps the digest and any other code edit changes it. A root whose
    source cannot be read (defined in ``__main__`` or by ``exec``) enters by its name alone."""
    return _closure_digest(tuple(sorted(set(roots))))


@functools.lru_cache(maxsize=None)
def _closure_digest(roots: tuple[str, ...]) -> str:
    packages = {PACKAGE} | {r.partition(".")[0] for r in roots}
    code, todo = {}, list(roots)
    while todo:
        name = todo.pop()
        if name in code or name in NOT_RESULT_CODE:
            continue
        src = module_source(name)
        if src is None:
            code[name] = "" if name in roots else None
            continue
        code[name] = normalized_code(src)
        todo.extend(package_imports(src, name, is_package=_is_package(name), packages=packages))
    blob = "\n".join(f"{n}\n{c}" for n, c in sorted(code.items()) if c is not None)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def module_source(name: str) -> str | None:
    """Source text of module ``name`` (imported or importable, from files or a zip), or None when
    there is none (a name that is not a module, a built-in or compiled module)."""
    try:
        module = sys.modules.get(name)
        if module is not None:
            return inspect.getsource(module)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_source"):
            return None
        return spec.loader.get_source(name)
    except (ImportError, ValueError, OSError, TypeError):
        return None


def _is_package(name: str) -> bool:
    """Whether module ``name`` is a package (its relative imports start at itself), whether or not
    it has been imported yet, so a digest never depends on import order."""
    module = sys.modules.get(name)
    if module is not None:
        return hasattr(module, "__path__")
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.submodule_search_locations is not None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_imports(src: str, name: str, is_package: bool = False, packages: Iterable[str] = (PACKAGE,)) -> set[str]:
    """Names of the modules under the top-level ``packages`` that the source ``src`` of module
    ``name`` imports (``from .x import y``, ``from . import x``, ``from pytest_advprune.x import y``,
    ``import pytest_advprune.x``), inside functions too but not under ``if TYPE_CHECKING:``; names
    that turn out not to be modules are dropped by the caller, and so are the top-level packages
    themselves. Unparsable source imports nothing."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            node.body = []
    packages = tuple(packages)
    inside = lambda module: module.partition(".")[0] in packages
    parent = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if inside(a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.rsplit(".", node.level - 1)[0] if node.level > 1 else parent
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if not module or not inside(module):
                continue
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names if a.name != "*")
    return out - set(packages)


def normalized_code(src: str) -> str:
    """What of a module's source ``src`` can change a result: its syntax tree without docstrings
    and without class-level ``known_failures`` assignments (they change verdicts, not artefacts),
    dumped without line numbers, so comments and layout do not count. Unparsable source is
    returned as it is."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return src
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.ClassDef):
            body = [stmt for stmt in body if not _assigns_known_failures(stmt)] or [ast.Pass()]
        node.body = body
    return ast.dump(tree)


def _assigns_known_failures(stmt: ast.stmt) -> bool:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else []
    return any(isinstance(t, ast.Name) and t.id == "known_failures" for t in targets)


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
