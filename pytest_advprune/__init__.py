"""pytest-advprune: a conformance benchmark for adversarial pruning (AP) methods.

The engine modules (``data``, ``models``, ``sparsity``, ``training``, ``attacks``,
``evaluate``, ``cache``, ``report``, ``session``) know nothing of pytest and can be
used from a notebook; ``plugin`` holds the pytest hooks.
"""

__version__ = "0.1.0"
