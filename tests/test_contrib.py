"""Contribution gating: completeness of a method (``contrib.problems``), the methods a change
touches (``changed_files`` / ``methods_in_files``, on a throwaway git repository), the CLI, and
the pull-request workflow that chains them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pytest_advprune import contrib, registry

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "conformance.yml"

registry.load_builtin()

METHOD = '''{docstring}
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register


@register
class Throwaway(Method):
    name = {name!r}
    taxonomy = Taxonomy(paper={paper!r}, pipeline=Pipeline.AFTER, step1={step1!r}, step2="AT (PGD)",
                        schedule=Schedule.ONE_SHOT, locality=Locality.LOCAL, criterion=Criterion.LWM)
    structures = ("weights",)

    def prune(self, ctx):
        return ctx.dense
'''
DOC = '"""Throwaway — Doe et al., "Pruning for tests", 2024."""'


def method_source(name: str, docstring: str = DOC, paper: str = "Doe et al., 2024", step1: str = "AT (PGD)") -> str:
    return METHOD.format(docstring=docstring, name=name, paper=paper, step1=step1)


@pytest.fixture
def isolated_registry(monkeypatch):
    """A copy of the registry for this test: throwaway methods vanish afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


_counter = [0]


def load_method_file(path: Path, monkeypatch) -> None:
    """Import ``path`` as a fresh module (registering its method in the isolated registry)."""
    _counter[0] += 1
    name = f"advprune_test_contrib_{path.stem}_{_counter[0]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)


def make_method(repo: Path, monkeypatch, name: str, *, with_test: bool = True, **source) -> Path:
    """``repo/methods/<name>.py`` registering method ``name``, plus ``repo/tests/test_method_<name>.py``."""
    (repo / "methods").mkdir(parents=True, exist_ok=True)
    (repo / "tests").mkdir(exist_ok=True)
    path = repo / "methods" / f"{name}.py"
    path.write_text(method_source(name, **source))
    if with_test:
        (repo / "tests" / f"test_method_{name}.py").write_text("def test_core_step():\n    assert True\n")
    load_method_file(path, monkeypatch)
    return path


# ================================================================== problems


@pytest.mark.parametrize("name", ["hydra", "lwm", "dense", "random"])
def test_builtin_methods_are_complete(name):
    assert contrib.problems(name, repo=REPO) == []


def test_complete_throwaway_method_has_no_problems(tmp_path, monkeypatch, isolated_registry):
    make_method(tmp_path, monkeypatch, "okmethod")
    assert contrib.problems("okmethod", repo=tmp_path) == []  # an empty 'repository' is allowed


@pytest.mark.parametrize("field, change", [("paper", {"paper": ""}), ("paper", {"paper": "   "}),
                                           ("step1", {"step1": ""})])
def test_empty_taxonomy_field_is_reported(tmp_path, monkeypatch, isolated_registry, field, change):
    make_method(tmp_path, monkeypatch, "notax", **change)
    assert contrib.problems("notax", repo=tmp_path) == [f"notax: taxonomy field {field!r} is empty"]


def test_missing_docstring_is_reported(tmp_path, monkeypatch, isolated_registry):
    make_method(tmp_path, monkeypatch, "nodoc", docstring="")
    assert contrib.problems("nodoc", repo=tmp_path) == ["nodoc: the module has no docstring naming the paper it implements"]


def test_missing_core_step_test_is_reported(tmp_path, monkeypatch, isolated_registry):
    make_method(tmp_path, monkeypatch, "notest", with_test=False)
    assert contrib.problems("notest", repo=tmp_path) == ["notest: no test of its core step; add tests/test_method_notest.py"]


@pytest.mark.parametrize("line", ["from methods.shared_name import Throwaway", "from methods import shared_name"])
def test_a_test_file_importing_the_module_counts_as_core_step_test(tmp_path, monkeypatch, isolated_registry, line):
    make_method(tmp_path, monkeypatch, "shared_name", with_test=False)
    (tmp_path / "tests" / "test_baselines.py").write_text(f"{line}\n\ndef test_it():\n    pass\n")
    assert contrib.problems("shared_name", repo=tmp_path) == []


def test_every_problem_is_listed(tmp_path, monkeypatch, isolated_registry):
    make_method(tmp_path, monkeypatch, "allbad", with_test=False, docstring="", paper="")
    registry.get("allbad").structures = ()
    assert contrib.problems("allbad", repo=tmp_path) == [
        "allbad: taxonomy field 'paper' is empty",
        "allbad: declares no structures",
        "allbad: the module has no docstring naming the paper it implements",
        "allbad: no test of its core step; add tests/test_method_allbad.py",
    ]


def test_check_cli_exits_1_listing_problems(tmp_path, monkeypatch, isolated_registry, capsys):
    make_method(tmp_path, monkeypatch, "okmethod")
    make_method(tmp_path, monkeypatch, "nodoc", docstring="")
    monkeypatch.chdir(tmp_path)
    assert contrib.main(["check", "okmethod"]) == 0
    assert capsys.readouterr().out == ""
    assert contrib.main(["check", "okmethod", "nodoc"]) == 1
    assert capsys.readouterr().out.splitlines() == ["nodoc: the module has no docstring naming the paper it implements"]


def test_check_hydra_from_the_command_line_exits_0():
    proc = subprocess.run([sys.executable, "-m", "pytest_advprune.contrib", "check", "hydra"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


# ================================================================== changed_files / methods_in_files


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=advprune tests", "-c", "user.email=tests@example.invalid",
           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True).stdout


def unique_source(name: str, **changes) -> str:
    """A method file whose lines are mostly its own, so git pairs no two files as a rename."""
    return method_source(name, **changes) + "".join(f"# {name} note {i}\n" for i in range(60))


@pytest.fixture
def pr_repo(tmp_path):
    """A git repository: ``main`` has methods/a.py, c.py, e.py, g.py; branch ``feature`` changes a.py,
    adds b.py and tools/x.py, deletes c.py and renames e.py to f.py; afterwards ``main`` adds d.py
    and changes g.py. ``feature`` is checked out."""
    repo = tmp_path / "repo"
    (repo / "methods").mkdir(parents=True)
    (repo / "tools").mkdir()
    git(repo, "init", "-q")
    for stem, name in (("a", "alpha"), ("c", "charlie"), ("e", "echo"), ("g", "golf")):
        (repo / "methods" / f"{stem}.py").write_text(unique_source(name))
    (repo / "README.md").write_text("throwaway\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "methods" / "a.py").write_text(unique_source("alpha", paper="Doe et al., 2025"))
    (repo / "methods" / "b.py").write_text(unique_source("beta"))
    (repo / "tools" / "x.py").write_text(unique_source("xray"))
    (repo / "methods" / "c.py").unlink()
    git(repo, "mv", "methods/e.py", "methods/f.py")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "feature")
    git(repo, "checkout", "-q", "main")
    (repo / "methods" / "d.py").write_text(unique_source("delta"))
    (repo / "methods" / "g.py").write_text(unique_source("golf", paper="Roe et al., 2026"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "main moves on")
    git(repo, "checkout", "-q", "feature")
    return repo


FEATURE_CHANGES = ["methods/a.py", "methods/b.py", "methods/f.py", "tools/x.py"]


def test_changed_files_since_the_merge_base(pr_repo):
    # not c.py (deleted), not d.py / g.py (changed on main after the branch point); f.py is e.py renamed
    assert sorted(contrib.changed_files("main", "feature", repo=pr_repo)) == FEATURE_CHANGES
    assert sorted(contrib.changed_files("main", repo=pr_repo)) == FEATURE_CHANGES  # head defaults to HEAD
    assert contrib.changed_files("feature", "feature", repo=pr_repo) == []
    git(pr_repo, "checkout", "-q", "main")
    assert sorted(contrib.changed_files("main", "feature", repo=pr_repo)) == FEATURE_CHANGES  # head is not HEAD
    assert contrib.changed_files("main", repo=pr_repo) == []


def test_changed_files_unknown_base_raises(pr_repo):
    with pytest.raises(subprocess.CalledProcessError):
        contrib.changed_files("no-such-branch", repo=pr_repo)


@pytest.fixture
def pr_methods(pr_repo, monkeypatch, isolated_registry):
    """The methods of every file of ``pr_repo``'s working tree (feature checked out) and of d.py, registered."""
    for path in sorted((pr_repo / "methods").glob("*.py")) + [pr_repo / "tools" / "x.py"]:
        load_method_file(path, monkeypatch)
    (pr_repo / "methods" / "d.py").write_text(git(pr_repo, "show", "main:methods/d.py"))  # on main only
    load_method_file(pr_repo / "methods" / "d.py", monkeypatch)
    assert {"alpha", "beta", "echo", "golf", "xray", "delta"} <= set(registry.names())
    return pr_repo


def test_methods_in_files_maps_changed_method_files_to_names(pr_methods):
    files = contrib.changed_files("main", "feature", repo=pr_methods)
    assert contrib.methods_in_files(files, repo=pr_methods) == ["alpha", "beta", "echo"]  # not xray: tools/ is not methods/
    assert contrib.methods_in_files(["methods/b.py"], repo=pr_methods) == ["beta"]
    assert contrib.methods_in_files(["README.md", "methods/notes.txt"], repo=pr_methods) == []


def test_changed_cli_prints_the_comma_list(pr_methods, monkeypatch, capsys):
    monkeypatch.chdir(pr_methods)
    assert contrib.main(["changed", "--base", "main", "--head", "feature"]) == 0
    assert capsys.readouterr().out == "alpha,beta,echo\n"
    assert contrib.main(["changed", "--base", "feature"]) == 0
    assert capsys.readouterr().out == "\n"


def test_methods_in_files_of_this_repository():
    files = ["methods/hydra.py", "README.md", "pytest_advprune/contrib.py", "tests/test_method_hydra.py"]
    assert contrib.methods_in_files(files, repo=REPO) == ["hydra"]
    assert contrib.methods_in_files(["methods/lwm.py", "methods/hydra.py"], repo=REPO) == ["hydra", "lwm"]
    assert contrib.methods_in_files([], repo=REPO) == []


# ================================================================== the pull-request workflow


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(workflow: dict) -> list[dict]:
    (job,) = workflow["jobs"].values()
    return job["steps"]


def _index(steps: list[dict], predicate) -> int:
    found = [i for i, s in enumerate(steps) if predicate(s)]
    assert len(found) == 1, f"expected one matching step, found {len(found)}"
    return found[0]


def test_workflow_triggers_on_pull_requests(workflow):
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "pull_request" in on
    paths = on["pull_request"].get("paths", [])
    assert any(p.startswith("methods/") for p in paths), paths


def test_workflow_gates_the_changed_methods(workflow):
    steps = _steps(workflow)
    run = lambda s: s.get("run", "")
    checkout = _index(steps, lambda s: s.get("uses", "").startswith("actions/checkout@"))
    assert steps[checkout].get("with", {}).get("fetch-depth") == 0, "the merge base needs the full history"
    changed = _index(steps, lambda s: "python -m pytest_advprune.contrib changed" in run(s))
    assert "--base" in run(steps[changed]) and "id" in steps[changed]
    output = f"steps.{steps[changed]['id']}.outputs.methods"
    check = _index(steps, lambda s: "python -m pytest_advprune.contrib check" in run(s))
    smoke = _index(steps, lambda s: "pytest " in run(s) and "--advprune-preset=smoke" in run(s))
    quick = _index(steps, lambda s: "pytest " in run(s) and "--advprune-preset=quick" in run(s))
    upload = _index(steps, lambda s: s.get("uses", "").startswith("actions/upload-artifact@"))
    assert checkout < changed < check < smoke < quick < upload
    for i in (check, smoke, quick):
        assert output in run(steps[i]), steps[i]
        assert output in steps[i].get("if", ""), f"step {steps[i].get('name')} must be skipped when no method changed"
    for i in (smoke, quick):
        assert f"--advprune-method=${{{{ {output} }}}}" in run(steps[i])
    assert steps[upload]["with"]["path"].rstrip("/") == "reports"
    assert "always()" in steps[upload].get("if", ""), "reports of a failing run must be uploaded too"
