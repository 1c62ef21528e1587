"""Shared test helpers, imported by the tests of every layer (pyproject puts tests/ on the path;
tests/conftest.py only registers the schema): ``launch`` (the real launchers, ports, run folders), ``configs``
(Hydra's compose API and the one-line config error checks), ``moe_reference`` (per-token float64 MoE math),
``fatal_worker`` (a launched rank that finds a fatal error)."""
