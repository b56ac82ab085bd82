"""Keep the cyclic garbage collector's full collections off the serving path.

After start-up a server process holds a large, long-lived heap: torch and the other imported modules, the
loaded models, the catalogue (about 236,000 GC-tracked objects in a process that built the app on CPU).
Every full (generation-2) collection walks all of it: 100–140 ms each on this repository's 2-core CPU
machine — an event-loop stall that every request in flight waits out (and that the front end's lag
shedding, server/looplag.py, sees), or a stall of the sampling loop in the engine process. Full
collections are rare (Python starts one when the objects surviving younger collections reach a quarter of
the long-lived ones), but they come. Freezing the start-up heap moves those objects into the permanent
generation, which collections skip (the same full collection then takes well under 1 ms); what serving
allocates is still collected as before.

Objects frozen here are never collected, even if they later become unreachable in a reference cycle: call
it only in a process that keeps what it loaded (``python -m server``, the engine process), not in one that
builds and drops many apps (the tests).
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze every object still alive; returns how many objects are frozen. Call once the
    process has loaded everything it keeps (the garbage of loading is collected first, not frozen)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
