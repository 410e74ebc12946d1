"""The in-repo collection of adversarial pruning methods, one file per method.

Installed as ``pytest_advprune.methods``; every module here is imported by the registry and
registers its class with :func:`pytest_advprune.registry.register`.
"""
