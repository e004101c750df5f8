"""Shared by scripts/bench-net and its modules: scripts/bench-local loaded
as the module `bench_local` (it has no .py suffix), once per process.

    from bench_common import bl

The lib modules take the measuring, scheduling and reporting helpers from
there, so the two harnesses time every tool the same way.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _load_bench_local():
    """Import scripts/bench-local (no .py suffix) as the module `bench_local`."""
    if "bench_local" in sys.modules:
        return sys.modules["bench_local"]
    path = Path(__file__).resolve().parent.parent / "bench-local"
    sys.dont_write_bytecode = True  # no __pycache__ in scripts/
    loader = importlib.machinery.SourceFileLoader("bench_local", str(path))
    spec = importlib.util.spec_from_loader("bench_local", loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_local"] = mod  # dataclasses look their module up here
    loader.exec_module(mod)
    return mod


bl = _load_bench_local()
