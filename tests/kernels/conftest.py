"""Fixtures of the kernel tests: ``triton_backend`` is shared by every test (tests/conftest.py)."""
