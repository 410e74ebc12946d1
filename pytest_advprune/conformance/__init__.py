"""The bundled conformance suite, collected when pytest runs with --advprune-method."""
