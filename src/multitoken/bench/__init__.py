"""``multitoken bench``: measuring (:mod:`~multitoken.bench.run`, timing one method
:mod:`~multitoken.bench.timing`), the peers measured against (:mod:`~multitoken.bench.peers`),
and the table and plot (:mod:`~multitoken.bench.plot`).

``multitoken.bench.X`` for a name of :mod:`~multitoken.bench.run` still works (it was one module
before issue 20); the lookup is lazy, so importing the plot alone does not load the runner.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    run = importlib.import_module("multitoken.bench.run")
    try:
        return getattr(run, name)
    except AttributeError:
        raise AttributeError(f"module 'multitoken.bench' has no attribute {name!r}") from None
