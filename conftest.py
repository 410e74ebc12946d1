"""Project-wide test settings. Kept free of pytest_plugins: this file is also met when the
bundled conformance suite of an editable install is collected from another rootdir."""

try:
    from hypothesis import settings
except ImportError:  # hypothesis is a test extra; the conformance suite does not need it
    settings = None

if settings is not None:
    # Property tests build small torch models: no per-example deadline on a loaded 2-core CI runner.
    settings.register_profile("advprune", deadline=None, max_examples=60)
    settings.load_profile("advprune")
