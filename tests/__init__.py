"""The test suite (a package, so `tests.conftest` is ours: verl and openrlhf install a top-level `tests`)."""
