"""Import paths from before the sub-packages (issue 20) keep working.

``import multitoken.generate`` or ``from multitoken.tree import Tree`` load the module's new home
(:data:`MOVED`) under the old name too: one module object, so a monkeypatch or an ``isinstance``
through either path sees the same thing. Installed by ``multitoken/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

# old module under multitoken -> its home now
MOVED = {
    "generate": "multitoken.decode.api",
    "ladder": "multitoken.decode.phases",
    "costs": "multitoken.decode.costs",
    "pace": "multitoken.decode.pace",
    "sampling": "multitoken.decode.sampling",
    "kvcache": "multitoken.decode.kvcache",
    "kernels": "multitoken.decode.kernels",
    "tree": "multitoken.decode.trees",
    "tree_ladder": "multitoken.decode.trees.step",
    "tree_dynamic": "multitoken.decode.trees.dynamic",
    "tree_auto": "multitoken.decode.trees.budget",
    "tree_lookup": "multitoken.decode.trees.lookup",
    "trainer": "multitoken.training.trainer",
    "data": "multitoken.training.data",
    "packing": "multitoken.training.packing",
    "featcache": "multitoken.training.featcache",
    "losses": "multitoken.training.losses",
    "evaluate": "multitoken.training.evaluate",
    "distill": "multitoken.training.distill",
    "training_plot": "multitoken.training.plot",
    "conversations": "multitoken.training.conversations",
    "checkpoint": "multitoken.io.checkpoint",
    "headfile": "multitoken.io.headfile",
    "exporter": "multitoken.io.export",
    "gguf": "multitoken.io.gguf",
    "v3layout": "multitoken.io.v3layout",
    "tokenizer_export": "multitoken.io.tokenizer_files",
    "fileio": "multitoken.io.atomic",
    "bench_peers": "multitoken.bench.peers",
    "bench_plot": "multitoken.bench.plot",
    "tokenizer": "multitoken.text.tokenizer",
    "chat": "multitoken.text.chat",
    "prompts": "multitoken.text.prompts",
}


class OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``multitoken.<old>`` and loads it as its new home's module object."""

    def find_spec(
        self, fullname: str, path=None, target=None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.partition(".")
        if package != "multitoken" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default empty module, replaced in exec_module

    def exec_module(self, module: ModuleType) -> None:
        # the import system returns whatever sys.modules holds under the name after this call
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__[11:]])


def install() -> None:
    if not any(isinstance(finder, OldPaths) for finder in sys.meta_path):
        sys.meta_path.append(OldPaths())
