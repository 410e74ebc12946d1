"""Conformance tests, one of each per cell (method, dataset, arch, structure, sparsity).

The cell's model is built once per session (``AdvPruneSession.result``); each test states one
verdict of the protocol: the achieved sparsity meets the target, clean accuracy meets the
preset's floor, robust accuracy under the preset's fixed attacks meets its floor, and each
attack-failure indicator (``pytest_advprune.indicators``) finds the evaluation trustworthy.
"""

import pytest

from pytest_advprune.indicators import NAMES


def _assert(session, cell, kind):
    verdict = session.check(cell, kind)
    if verdict.passed is None:
        pytest.skip(verdict.message)
    if not verdict.passed:
        pytest.fail(f"{cell.id}: {verdict.message}", pytrace=False)


def test_sparsity(advprune_session, advprune_cell):
    _assert(advprune_session, advprune_cell, "sparsity")


def test_clean_accuracy(advprune_session, advprune_cell):
    _assert(advprune_session, advprune_cell, "clean")


def test_robust_accuracy(advprune_session, advprune_cell):
    _assert(advprune_session, advprune_cell, "robust")


@pytest.mark.parametrize("advprune_indicator", NAMES)
def test_attack_indicator(advprune_session, advprune_cell, advprune_indicator):
    _assert(advprune_session, advprune_cell, f"indicator:{advprune_indicator}")
