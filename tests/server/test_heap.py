"""freeze_startup_heap: what is alive is frozen out of the cyclic GC's reach; garbage is collected first,
and what is allocated afterwards is collected as before. (In a subprocess: a frozen object is never
collected, so the test runner's own heap stays unfrozen.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_freeze_keeps_collecting_new_garbage() -> None:
    code = textwrap.dedent(
        """
        import gc, weakref
        from server.heap import freeze_startup_heap

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)

        kept = [Node() for _ in range(1000)]          # alive at start-up: frozen
        dead = cycle()                                # start-up garbage in a cycle: collected, not frozen
        n = freeze_startup_heap()
        assert dead() is None, "start-up garbage was frozen instead of collected"
        assert n >= 1000 and gc.get_freeze_count() == n
        assert not any(o is kept[0] for o in gc.get_objects())  # frozen objects are out of the GC's lists
        later = cycle()                               # garbage made while serving
        gc.collect()
        assert later() is None, "a cycle made after the freeze was not collected"
        print("ok", n)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
