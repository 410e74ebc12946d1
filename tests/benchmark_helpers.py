"""Load a script of ``benchmarks/`` as a module, so tests call its functions and ``main(argv)`` in process."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A fresh module of ``benchmarks/<name>.py``, its folder on ``sys.path`` as when run as a script
    (the scripts import their sibling ``benchmark_cli``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exits_before_building(name: str, args: list[str], tmp_path: Path) -> str:
    """Run ``benchmarks/<name>.py`` with ``args`` (plus a cache and output under ``tmp_path``, on the CPU),
    assert it stops with a one-line SystemExit before creating the cache, and return that line."""
    import pytest

    with pytest.raises(SystemExit) as info:
        load_benchmark(name).main([*args, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--out", str(tmp_path)])
    assert "\n" not in str(info.value) and not (tmp_path / "cache").exists()
    return str(info.value)
