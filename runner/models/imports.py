"""Importing the heavy libraries (torch, transformers, TransformerLens) without paying the garbage collector.

Importing TransformerLens creates a few million Python objects (it pulls in transformers, datasets,
pandas, scipy and sympy). CPython's cyclic collector runs a full pass over every tracked object each
time enough new ones pile up, so about a quarter of the import time went to collections that find
nothing: module-level objects live as long as the process. At exit it walks them all once more
(about 1.5 s after TransformerLens is loaded). Here the collector is paused during such an import,
and the objects the import created are frozen (``gc.freeze``: moved out of the collector's sight),
once per process and only by the call that actually imported; at exit what is still tracked is
frozen too, so the interpreter's final collections skip it. Reference counting still frees
everything as usual; only cycles among frozen objects are never collected, which is what
happens to module-level state anyway.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["import_heavy", "paused_gc"]

_exit_freeze_registered = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off (restored as it was afterwards)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def import_heavy(name: str) -> tuple[ModuleType, float]:
    """Import module ``name`` with the collector paused, then freeze what it created; returns the module and
    the seconds the import took (0.0 when it was imported already, and then nothing is frozen)."""
    if name in sys.modules:
        return sys.modules[name], 0.0
    started = time.perf_counter()
    with paused_gc():
        module = importlib.import_module(name)
    gc.freeze()
    _freeze_at_exit()
    return module, time.perf_counter() - started


def _freeze_at_exit() -> None:
    """Register (once) ``gc.freeze`` to run at exit before the interpreter's own final collections.

    atexit runs the last registered function first, so this runs before the handlers of the
    libraries imported before it; they need no collection.
    """
    global _exit_freeze_registered
    if not _exit_freeze_registered:
        atexit.register(gc.freeze)
        _exit_freeze_registered = True
