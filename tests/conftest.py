"""Shared fixtures of the project's tests.

The plugin tests run pytest inside pytest (``pytester``), always on the ``smoke`` preset and
always against one cache folder per test session, so the smoke dense model is trained and
evaluated once (by :func:`dense_cache`, in a subprocess) and every later run loads it.

Set ``ADVPRUNE_TEST_CACHE_DIR`` to keep that cache between test sessions (faster local
iteration); by default it lives in the session's temporary folder and starts empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Every built cell counts its FLOPs with torch's FlopCounterMode, whose first use imports
# torch._dynamo. Imported here, before any pytester in-process run snapshots sys.modules: a module
# first imported inside such a run is dropped afterwards, and re-importing torch._dynamo in the
# next run would register torch's operator libraries twice (RuntimeError).
import torch._dynamo  # noqa: F401,E402

SMOKE = "--advprune-preset=smoke"


@pytest.fixture(scope="session")
def advprune_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder (dense/pruned models, evaluations, data) shared by every test of the session."""
    keep = os.environ.get("ADVPRUNE_TEST_CACHE_DIR")
    if keep:
        path = Path(keep).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("advprune-cache")


@pytest.fixture(scope="session")
def dense_cache(advprune_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared cache with the smoke dense model trained and evaluated, built once in a subprocess
    (so in-process runs of the ``dense`` cell afterwards only load it)."""
    workdir = tmp_path_factory.mktemp("advprune-warmup")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "ADVPRUNE_CACHE_DIR")}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--advprune-method=dense", SMOKE,
           f"--advprune-cache-dir={advprune_cache_dir}", f"--advprune-report={workdir / 'reports' / 'smoke.md'}"]
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"warming the smoke dense model took over {exc.timeout:.0f}s (a minute or two on an idle 2-core "
                    f"CPU); is the machine overloaded?\n{out}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(f"warming the smoke dense model failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}",
                    pytrace=False)
    return advprune_cache_dir


class AdvPruneRun:
    """Runs pytest with pytest-advprune inside a ``pytester`` folder.

    Every run gets ``--advprune-preset=smoke``, the shared ``--advprune-cache-dir`` and a report
    inside the pytester folder (``reports/smoke.md`` there) unless told otherwise, plus a JUnit
    XML file from which :meth:`cases` reads each test's outcome and message.
    """

    def __init__(self, pytester: pytest.Pytester, cache_dir: Path):
        self.pytester = pytester
        self.cache_dir = cache_dir
        self.report_md = pytester.path / "reports" / "smoke.md"
        self.junit = pytester.path / "junit.xml"

    @property
    def report_json(self) -> Path:
        return self.report_md.with_suffix(".json")

    def args(self, *extra: str, preset: bool = True, cache: bool = True, report: bool = True) -> list[str]:
        out = []
        if preset:
            out.append(SMOKE)
        if cache:
            out.append(f"--advprune-cache-dir={self.cache_dir}")
        if report:
            out.append(f"--advprune-report={self.report_md}")
        return out + [f"--junitxml={self.junit}", *extra]

    def inprocess(self, *extra: str, **opts) -> pytest.RunResult:
        """In-process run: for runs that build nothing new (collection, usage errors, cached cells)."""
        self.junit.unlink(missing_ok=True)
        return self.pytester.runpytest_inprocess(*self.args(*extra, **opts))

    def subprocess(self, *extra: str, timeout: float = 900, **opts) -> pytest.RunResult:
        """Subprocess run: for runs that prune, train or evaluate, or import a methods dir."""
        self.junit.unlink(missing_ok=True)
        return self.pytester.runpytest_subprocess(*self.args(*extra, **opts), timeout=timeout)

    def cases(self) -> dict[str, tuple[str, str]]:
        """``{"test_sparsity[<cell id>]": (outcome, message)}`` of the last run's JUnit XML;
        outcome among passed, failed, skipped, error."""
        out = {}
        for case in ET.parse(self.junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (node.get("message") or "") + "\n" + (node.text or "")
                    break
            out[case.get("name")] = (outcome, message)
        return out

    def load_report(self, json_path: Path | None = None) -> dict:
        return json.loads((json_path or self.report_json).read_text())

    def records(self, json_path: Path | None = None) -> dict[str, dict]:
        """The report's records by cell id (``method-dataset-arch-structure-sparsity``)."""
        out = {}
        for r in self.load_report(json_path)["records"]:
            cell = f"{r['method']}-{r['dataset']}-{r['arch']}-{r['structure']}-{round(100 * r['target_sparsity'])}"
            assert cell not in out, f"two records for cell {cell}"
            out[cell] = r
        return out

    def write_methods(self, folder: str = "contrib", **sources: str) -> Path:
        """Write ``name=source`` method files into ``folder`` of the pytester dir; return the folder."""
        path = self.pytester.path / folder
        path.mkdir(exist_ok=True)
        for name, source in sources.items():
            (path / f"{name}.py").write_text(source)
        return path


@pytest.fixture
def advprune(pytester: pytest.Pytester, advprune_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AdvPruneRun:
    """A runner of pytest-advprune inside this test's pytester folder, on the shared cache."""
    monkeypatch.delenv("ADVPRUNE_CACHE_DIR", raising=False)
    monkeypatch.delenv("ADVPRUNE_DATA_DIR", raising=False)
    return AdvPruneRun(pytester, advprune_cache_dir)
