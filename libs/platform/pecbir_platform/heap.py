"""The garbage collector's view of a service's start-up heap.

A service imports numpy, numba, pydicom, pydantic, FastAPI and their dictionaries before it
serves anything: about 300 000 objects that live as long as the process. CPython's full
(generation 2) collections walk all of them each time, 0.2-0.4 s with the GIL held on the
2-core machine, during which no request thread runs; they come by themselves after enough
allocations (an ingest allocates a lot) and, in the DIMSE SCP, from pynetdicom, which calls
`gc.collect()` every 30 s. `freeze_startup_heap` moves what exists once start-up is done
into the permanent generation (`gc.freeze`), so that later collections only walk what
requests allocate. A frozen object is still freed when its last reference goes; only a
reference cycle among frozen objects is never collected (start-up state is not freed anyway).
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object that survived; how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
