"""Errors the engine raises for bad input; each message is one line that says how to fix it."""


class AdvPruneError(Exception):
    """Base class: a user-facing problem (bad option, missing data, bad checkpoint)."""


class DatasetNotFound(AdvPruneError):
    """A dataset's files are not in any of the searched places."""


class UnknownMethod(AdvPruneError):
    """A method name that is not registered."""


class BadOption(AdvPruneError):
    """An option value outside its allowed range or vocabulary."""


class CorruptArtefact(AdvPruneError):
    """A cache entry or checkpoint whose bytes do not match what was written."""


class NonFiniteModel(AdvPruneError):
    """A model with NaN or inf weights, or that outputs NaN/inf logits."""


class BadPrunedModel(AdvPruneError):
    """A method's ``prune()`` returned a model whose weights do not fit its cell's architecture."""


class OverBudget(AdvPruneError):
    """A method asked to train for more epochs than the preset's budget leaves it."""


class BadDataset(AdvPruneError):
    """A dataset file that is present but unreadable: truncated, corrupt, or not in its format."""
