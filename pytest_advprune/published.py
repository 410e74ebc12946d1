"""The survey's published leaderboard, as reference data (``survey_leaderboard.json`` beside this
file: numbers as numbers, with their source). Keys: ``(method, dataset, arch, "weights" or
"structured", sparsity %)``; values ``(clean %, AutoAttack robust %)`` at Linf eps 8/255 (0.031)."""

from __future__ import annotations

import json
from pathlib import Path

DATA_FILE = Path(__file__).with_name("survey_leaderboard.json")


def _load() -> dict[tuple[str, str, str, str, int], tuple[float, float]]:
    doc = json.loads(DATA_FILE.read_text())
    return {(r["method"], r["dataset"], r["arch"], r["structure"], r["sparsity"]): (r["clean"], r["robust"])
            for r in doc["records"]}


SURVEY = _load()
