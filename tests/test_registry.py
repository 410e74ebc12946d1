"""Method registry: registration rules, name resolution, method folders, listing, built-in taxonomy.

The registry is module-global state: every test that registers throwaway classes runs on a copy
of it (fixture ``isolated``), so the built-in methods stay as they were for the other tests."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch

from pytest_advprune import registry
from pytest_advprune.errors import AdvPruneError, OverBudget, UnknownMethod
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy

TAX = Taxonomy(paper="Doe et al., 2030", pipeline=Pipeline.AFTER, step1="AT (PGD)", step2="AT (PGD)",
               schedule=Schedule.ONE_SHOT, locality=Locality.GLOBAL, criterion=Criterion.LWM)


@pytest.fixture(scope="module", autouse=True)
def builtin():
    registry.load_builtin()


@pytest.fixture
def isolated(monkeypatch):
    """A private copy of the registry, restored after the test; user-method modules are dropped."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield registry._REGISTRY
    for name in [m for m in sys.modules if m.startswith("advprune_user_methods.")]:
        del sys.modules[name]


def make(name="throwaway", module="throwaway_module", **attrs):
    """A method class named ``name`` defined in (pretend) module ``module``; ``attrs`` override
    ``taxonomy``/``structures``; an attribute set to ``...`` is left out."""
    ns = {"name": name, "taxonomy": TAX, "structures": ("weights",), "__module__": module}
    ns.update(attrs)
    ns = {k: v for k, v in ns.items() if v is not ...}
    return type("Throwaway", (Method,), ns)


# ------------------------------------------------------------------------------ register


def test_register_adds_the_class_and_returns_it(isolated):
    cls = make()
    assert registry.register(cls) is cls
    assert registry.get("throwaway") is cls
    assert "throwaway" in registry.names()


@pytest.mark.parametrize("missing", ["name", "taxonomy", "structures"])
def test_register_rejects_a_class_without_a_required_attribute(isolated, missing):
    with pytest.raises(AdvPruneError, match=f"has no '{missing}'"):
        registry.register(make(**{missing: ...}))
    assert "throwaway" not in isolated


@pytest.mark.parametrize("structures", [("pixels",), ("weights", "kernels"), (), ("Weights",)])
def test_register_rejects_bad_structures(isolated, structures):
    with pytest.raises(AdvPruneError, match="structures must be among weights, filters, channels, dense"):
        registry.register(make(structures=structures))
    assert "throwaway" not in isolated


@pytest.mark.parametrize("structures", [("weights",), ("filters", "channels"), ("dense",), ("weights", "filters")])
def test_register_accepts_good_structures(isolated, structures):
    registry.register(make(structures=structures))
    assert isolated["throwaway"].structures == structures


@pytest.mark.parametrize("taxonomy", [None, "A, 1S, L, LWM", dataclasses.asdict(TAX), TAX.row(("weights",))])
def test_register_rejects_a_taxonomy_that_is_not_a_Taxonomy(isolated, taxonomy):
    with pytest.raises(AdvPruneError, match="taxonomy must be a pytest_advprune.registry.Taxonomy"):
        registry.register(make(taxonomy=taxonomy))
    assert "throwaway" not in isolated


def test_register_rejects_the_same_name_from_another_module(isolated):
    first = registry.register(make(module="pkg_one.mine"))
    with pytest.raises(AdvPruneError, match=r"'throwaway' is registered twice \(pkg_one.mine and pkg_two.mine\)") as info:
        registry.register(make(module="pkg_two.mine"))
    assert "\n" not in str(info.value)
    assert isolated["throwaway"] is first


def test_register_rejects_a_builtin_name_from_a_user_module(isolated):
    hydra = isolated["hydra"]
    with pytest.raises(AdvPruneError, match="registered twice"):
        registry.register(make(name="hydra", module="my_methods.hydra_copy"))
    assert isolated["hydra"] is hydra


def test_reregistering_the_same_class_is_allowed(isolated):
    """Importing a method module again (e.g. a reloaded file) re-registers the same class."""
    registry.register(make(module="pkg.mine"))
    again = make(module="pkg.mine")
    registry.register(again)
    assert isolated["throwaway"] is again


# ------------------------------------------------------------------------------ get / resolve


def test_resolve_all_is_every_registered_name_sorted(isolated):
    registry.register(make(name="zz_last"))
    registry.register(make(name="aa_first"))  # registered after the others, listed first
    everything = registry.resolve("all")
    assert everything == sorted(isolated) == registry.names()
    assert everything[0] == "aa_first" and everything[-1] == "zz_last"
    assert registry.resolve("  all ") == everything
    assert {"dense", "hydra", "lwm", "random"} <= set(everything)


def test_resolve_a_comma_list_with_spaces_and_duplicates():
    assert registry.resolve("hydra") == ["hydra"]
    assert registry.resolve(" lwm , hydra,lwm ,, dense , hydra") == ["lwm", "hydra", "dense"]
    assert registry.resolve("random,") == ["random"]


@pytest.mark.parametrize("spec, unknown", [("nosuch", "nosuch"), ("hydra,nosuch", "nosuch"), ("HYDRA", "HYDRA"),
                                           ("hydra, all", "all")])
def test_resolve_unknown_names_raise_listing_the_registered_ones(spec, unknown):
    with pytest.raises(UnknownMethod) as info:
        registry.resolve(spec)
    message = str(info.value)
    assert f"unknown method {unknown!r}" in message
    assert message.endswith("registered: " + ", ".join(registry.names()))
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["", " ", ",", " , ,"])
def test_resolve_an_empty_spec_raises(spec):
    with pytest.raises(UnknownMethod) as info:
        registry.resolve(spec)
    assert str(info.value) == "--advprune-method is empty; registered: " + ", ".join(registry.names())


def test_get_unknown_raises_unknown_method_a_subclass_of_advprune_error():
    with pytest.raises(AdvPruneError, match="registered: .*hydra"):
        registry.get("nope")
    assert issubclass(UnknownMethod, AdvPruneError)


# ------------------------------------------------------------------------------ load_dir

METHOD_FILE = '''"""{name}: a throwaway method (Doe et al., 2030)."""
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register


@register
class M(Method):
    name = "{name}"
    taxonomy = Taxonomy("Doe et al., 2030", Pipeline.BEFORE, "None", "AT (PGD)", Schedule.ITERATIVE,
                        Locality.GLOBAL, Criterion.HGM)
    structures = ("weights", "channels")
'''


def test_load_dir_imports_every_method_file_and_returns_the_new_names(isolated, tmp_path):
    (tmp_path / "one.py").write_text(METHOD_FILE.format(name="user_one"))
    (tmp_path / "two.py").write_text(METHOD_FILE.format(name="user_two"))
    (tmp_path / "helpers.py").write_text("X = 1\n")  # registers nothing: fine
    (tmp_path / "notes.txt").write_text("not python")
    assert registry.load_dir(tmp_path) == ["user_one", "user_two"]
    assert registry.load_dir(str(tmp_path)) == []  # nothing new the second time
    assert registry.resolve("user_two,hydra") == ["user_two", "hydra"]
    assert registry.get("user_one").taxonomy.row(registry.get("user_one").structures)["S/US"] == "US, S (channels)"


def test_load_dir_of_an_empty_folder_returns_nothing(isolated, tmp_path):
    assert registry.load_dir(tmp_path) == []


@pytest.mark.parametrize("source, kind", [
    ("import no_such_module_for_advprune\n", "ModuleNotFoundError"),
    ("def broken(:\n", "SyntaxError"),
    ("raise RuntimeError('method file exploded')\n", "RuntimeError: method file exploded"),
])
def test_load_dir_import_error_is_one_line_naming_the_file(isolated, tmp_path, source, kind):
    (tmp_path / "a_good.py").write_text(METHOD_FILE.format(name="user_good"))
    bad = tmp_path / "b_bad.py"
    bad.write_text(source)
    with pytest.raises(AdvPruneError) as info:
        registry.load_dir(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{bad}: importing the method file failed: ")
    assert kind in message
    assert "\n" not in message


@pytest.mark.parametrize("name, structures, reason", [
    ("hydra", '("weights",)', "registered twice"),  # a name the registry already holds
    ("user_bad", '("pixels",)', "structures must be among"),
], ids=["name-clash", "bad-structures"])
def test_load_dir_error_from_register_names_the_file(isolated, tmp_path, name, structures, reason):
    """A method file whose class ``register`` refuses is an import error of that file too: the
    one-line message must say which file it was (a folder may hold many method files)."""
    (tmp_path / "a_good.py").write_text(METHOD_FILE.format(name="user_good"))
    bad = tmp_path / "b_bad.py"
    bad.write_text(METHOD_FILE.format(name=name).replace('("weights", "channels")', structures))
    with pytest.raises(AdvPruneError) as info:
        registry.load_dir(tmp_path)
    message = str(info.value)
    assert reason in message
    assert str(bad) in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_load_dir_of_a_non_folder_raises_naming_the_option(isolated, tmp_path, kind):
    path = tmp_path / "nope"
    if kind == "file":
        path = tmp_path / "method.py"
        path.write_text(METHOD_FILE.format(name="user_file"))
    with pytest.raises(AdvPruneError, match=re.escape(f"--advprune-methods-dir={path}: not a folder")) as info:
        registry.load_dir(path)
    assert "\n" not in str(info.value)
    assert "user_file" not in isolated


# ------------------------------------------------------------------------------ listing and taxonomy


def _table(text: str) -> list[list[str]]:
    """tabulate's plain format: header, dashes, rows; columns split on runs of 2+ spaces."""
    lines = text.splitlines()
    assert set(lines[1]) <= {"-", " "}
    return [re.split(r"\s{2,}", line.strip()) for line in [lines[0]] + lines[2:]]


def test_listing_shows_every_method_with_its_taxonomy_columns(isolated):
    registry.register(make(name="zz_user", structures=("filters", "channels")))
    rows = _table(registry.listing())
    assert rows[0] == ["method", "pipeline", "pretrain / prune step", "finetune / train step", "1S/IT", "S/US", "L/G",
                       "criterion", "paper"]
    assert [r[0] for r in rows[1:]] == registry.names()
    by = {r[0]: r for r in rows[1:]}
    for name in registry.names():
        cls = registry.get(name)
        assert by[name][1:] == list(cls.taxonomy.row(cls.structures).values()), name
    assert by["zz_user"] == ["zz_user", "A", "AT (PGD)", "AT (PGD)", "1S", "S (filters, channels)", "G", "LWM",
                             "Doe et al., 2030"]
    assert by["hydra"][1:8] == ["A", "AT (TRADES)", "AT (TRADES)", "1S", "US", "L", "LIS"]


@pytest.mark.parametrize("structures, text", [
    (("weights",), "US"),
    (("filters",), "S (filters)"),
    (("channels",), "S (channels)"),
    (("weights", "filters"), "US, S (filters)"),
    (("filters", "channels", "weights"), "US, S (filters, channels)"),
    (("dense",), "-"),
    ((), "-"),
])
def test_taxonomy_row_structure_column(structures, text):
    assert TAX.row(structures)["S/US"] == text


def test_taxonomy_row_uses_the_short_codes():
    row = Taxonomy("P", Pipeline.DURING, "-", "AT (TRADES)", Schedule.ITERATIVE, Locality.LOCAL, Criterion.BCS).row(("weights",))
    assert row == {"pipeline": "D", "pretrain / prune step": "-", "finetune / train step": "AT (TRADES)", "1S/IT": "IT",
                   "S/US": "US", "L/G": "L", "criterion": "BCS", "paper": "P"}


def builtin_methods():
    registry.load_builtin()
    return sorted(registry._REGISTRY.items())


def test_the_builtin_collection_is_loaded():
    assert {"dense", "hydra", "lwm", "random"} <= set(registry.names())
    for name, cls in builtin_methods():
        assert cls.name == name


@pytest.mark.parametrize("name, cls", builtin_methods())
def test_builtin_method_has_a_complete_taxonomy(name, cls):
    tax = cls.taxonomy
    assert isinstance(tax, Taxonomy)
    for field in ("paper", "step1", "step2"):
        assert isinstance(getattr(tax, field), str) and getattr(tax, field).strip(), (name, field)
    assert isinstance(tax.pipeline, Pipeline) and isinstance(tax.schedule, Schedule)
    assert isinstance(tax.locality, Locality) and isinstance(tax.criterion, Criterion)
    row = tax.row(cls.structures)
    assert all(isinstance(v, str) and v.strip() for v in row.values()), row
    assert cls.structures and all(s in ("weights", "filters", "channels", "dense") for s in cls.structures)
    assert isinstance(cls.structures, tuple)
    if "dense" in cls.structures:
        assert cls.structures == ("dense",)  # the reference prunes nothing else
    else:
        assert tax.pipeline is not Pipeline.NONE and tax.criterion is not Criterion.NONE


@pytest.mark.parametrize("name, cls", builtin_methods())
def test_builtin_method_module_docstring_names_its_paper(name, cls):
    """The module docstring names the paper the taxonomy cites: the first author's surname
    (the word before ``et al.``), or for a paper-less baseline the word of its ``paper`` field."""
    doc = sys.modules[cls.__module__].__doc__
    assert doc and doc.strip(), f"{cls.__module__} has no module docstring"
    paper = cls.taxonomy.paper
    author = re.search(r"(\w+) et al\.", paper)
    expected = author.group(1) if author else paper
    assert expected.lower() in doc.lower(), f"{cls.__module__}'s docstring does not name {expected!r} ({paper})"


@pytest.mark.parametrize("name, cls", builtin_methods())
def test_builtin_method_is_a_method_with_prune(name, cls):
    assert issubclass(cls, Method)
    assert cls.prune is not Method.prune, f"{name} does not implement prune"
    assert cls.__module__.startswith("pytest_advprune.methods.")
    assert Path(sys.modules[cls.__module__].__file__).parent.name == "methods"


USER_METHOD = '''
{imports}
from pytest_advprune.registry import Criterion, Locality, Method, Pipeline, Schedule, Taxonomy, register


@register
class Sibling(Method):
    name = "sibling_user"
    taxonomy = Taxonomy(paper="Doe", pipeline=Pipeline.AFTER, step1="AT", step2="AT", schedule=Schedule.ONE_SHOT,
                        locality=Locality.LOCAL, criterion=Criterion.LWM)
    structures = ("weights",)
    keep = staticmethod(keep)

    def prune(self, ctx):
        return ctx.dense
'''


@pytest.mark.parametrize("helper", ["a_helper", "zz_helper"])  # sorts before / after the method file
@pytest.mark.parametrize("imports", [
    "from .{helper} import keep",
    "from advprune_user_methods.{helper} import keep",
    "import advprune_user_methods.{helper} as h\nkeep = h.keep",
])
def test_a_method_file_imports_a_helper_beside_it_in_any_form_and_order(isolated, tmp_path, helper, imports):
    (tmp_path / f"{helper}.py").write_text(f"def keep(s):\n    return 1 - s  # {helper}\n")
    (tmp_path / "method.py").write_text(USER_METHOD.format(imports=imports.format(helper=helper)))
    assert registry.load_dir(tmp_path) == ["sibling_user"]
    assert registry.get("sibling_user").keep(0.25) == 0.75


def test_a_second_folder_with_the_same_file_names_is_loaded_from_its_own_files(isolated, tmp_path):
    for n, value in ((1, "1 - s"), (2, "2 - s")):
        folder = tmp_path / f"dir{n}"
        folder.mkdir()
        (folder / "a_helper.py").write_text(f"def keep(s):\n    return {value}\n")
        (folder / "method.py").write_text(USER_METHOD.format(imports="from .a_helper import keep").replace(
            '"sibling_user"', f'"sibling_user{n}"'))
        assert registry.load_dir(folder) == [f"sibling_user{n}"]
        assert registry.get(f"sibling_user{n}").keep(0) == n


def test_a_prune_that_returns_no_model_is_a_one_line_cell_error(isolated, dense_cache):
    from pytest_advprune import presets
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig

    registry.register(make(name="returns_none", prune=lambda self, ctx: None))
    session = AdvPruneSession(RunConfig(presets.get("smoke"), ["returns_none"], cache_dir=str(dense_cache), device="cpu"))
    res = session.result(Cell("returns_none", "fashion_mnist", "cnn", "weights", 90), evaluated=False)
    assert "returns_none.prune returned NoneType, not the pruned model; return the nn.Module" in res.error
    assert "\n" not in res.error


def _torch_prune_global(self, ctx):
    import torch.nn.utils.prune as torch_prune

    layers = [(m, "weight") for m in ctx.dense.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=ctx.sparsity)
    return ctx.dense  # hooks left on: weight = weight_orig * weight_mask


class _HalfMask(torch.nn.Module):
    def forward(self, w):
        return w * (torch.arange(w.numel()).reshape(w.shape) % 10 != 0)


def _parametrized(self, ctx):
    from torch.nn.utils import parametrize

    for m in ctx.dense.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            parametrize.register_parametrization(m, "weight", _HalfMask())
    return ctx.dense


@pytest.mark.parametrize("prune, achieved", [(_torch_prune_global, 0.9), (_parametrized, 0.1)])
def test_a_model_returned_with_pruning_reparametrizations_left_on_is_folded_to_plain_weights(isolated, dense_cache,
                                                                                            prune, achieved):
    from pytest_advprune import presets
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig

    name = f"leaves{prune.__name__}"  # one cache entry per way of pruning
    registry.register(make(name=name, prune=prune))
    session = AdvPruneSession(RunConfig(presets.get("smoke"), [name], cache_dir=str(dense_cache), device="cpu"))
    cell = Cell(name, "fashion_mnist", "cnn", "weights", 90)
    res = session.result(cell, evaluated=False)
    assert res.error is None
    assert res.sparsity.sparsity == pytest.approx(achieved, abs=0.002)
    state, _ = session.cache.load_state("pruned", session.pruned_key(cell))
    assert not any(k.endswith(("_orig", "_mask")) or "parametrizations" in k for k in state)


def test_a_model_that_does_not_fit_its_architecture_is_a_one_line_cell_error_and_is_not_cached(isolated, dense_cache):
    from pytest_advprune import presets
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig

    def prune(self, ctx):
        ctx.dense.fc2 = torch.nn.Linear(ctx.dense.fc2.in_features, 5)
        ctx.dense.register_buffer("mask", torch.ones(1))
        return ctx.dense

    registry.register(make(name="wrong_shape", prune=prune))
    session = AdvPruneSession(RunConfig(presets.get("smoke"), ["wrong_shape"], cache_dir=str(dense_cache), device="cpu"))
    cell = Cell("wrong_shape", "fashion_mnist", "cnn", "weights", 90)
    res = session.result(cell, evaluated=False)
    assert res.error == ("wrong_shape.prune returned a model that does not fit the cnn architecture: unexpected mask; "
                         "shape mismatch fc2.weight (5, 128) vs (10, 128), fc2.bias (5,) vs (10,); "
                         "prune ctx.dense in place and return it")
    assert not session.cache.has("pruned", session.pruned_key(cell))


def test_a_method_that_trains_past_the_budget_is_stopped_with_a_one_line_cell_error(isolated, dense_cache):
    from pytest_advprune import presets
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig

    def prune(self, ctx):
        ctx.train(ctx.dense, ctx.preset.finetune.with_(epochs=ctx.preset.finetune.epochs / 2), "first half")
        ctx.train(ctx.dense, ctx.preset.finetune.with_(epochs=4), "overbudget fine-tune")
        return ctx.dense

    registry.register(make(name="overbudget", prune=prune))
    smoke = presets.get("smoke")
    session = AdvPruneSession(RunConfig(smoke, ["overbudget"], cache_dir=str(dense_cache), device="cpu"))
    cell = Cell("overbudget", "fashion_mnist", "cnn", "weights", 90)
    res = session.result(cell, evaluated=False)
    assert res.error == ("overbudget fine-tune: 4 more epochs would make 3 + 4.5 of the preset's budget of 5 (dense "
                         "pretraining + prune phase + fine-tune); split the budget between the phases")
    assert not session.cache.has("pruned", session.pruned_key(cell))


def test_work_charged_outside_train_counts_in_the_budget_and_cannot_overrun_it():
    from tests.method_helpers import tiny_context

    ctx = tiny_context(epochs=1.0)  # smoke's dense epochs + prune 1 + fine-tune 1
    ctx.charge(0.75, "saliency pass")
    assert ctx.budget() == {"pretrain": ctx.pretrain_epochs, "method": 0.75, "total": ctx.pretrain_epochs + 0.75}
    with pytest.raises(OverBudget, match=r"^fine-tune: 1.5 more epochs would make .* \+ 2.25 of the preset's budget"):
        ctx.train(ctx.dense, ctx.preset.finetune.with_(epochs=1.5), "fine-tune")
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cannot charge"):
            ctx.charge(bad, "pass")
    assert ctx.budget()["method"] == 0.75, "a refused charge must not count"


def test_a_method_cannot_call_fresh_model_and_train_the_pretrained_dense_on_the_from_scratch_budget(isolated, dense_cache):
    from pytest_advprune import presets
    from pytest_advprune.session import AdvPruneSession, Cell, RunConfig

    def prune(self, ctx):
        ctx.fresh_model()
        ctx.train(ctx.dense, ctx.preset.finetune, "fine-tune")
        return ctx.dense

    registry.register(make(name="sneaky", prune=prune))
    session = AdvPruneSession(RunConfig(presets.get("smoke"), ["sneaky"], cache_dir=str(dense_cache), device="cpu"))
    res = session.result(Cell("sneaky", "fashion_mnist", "cnn", "weights", 90), evaluated=False)
    assert res.error == ("fine-tune: trains ctx.dense, which is pretrained, after ctx.fresh_model() made the cell "
                         "from scratch; train the fresh model")
