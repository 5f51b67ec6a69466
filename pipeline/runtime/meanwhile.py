"""What a stage's process does on a thread while it waits on its Ray job."""

from __future__ import annotations

import importlib
import threading


def import_meanwhile(*modules: str) -> None:
    """Import `modules` on a daemon thread. Call it right before the job's blocking call (the
    first `fit()`, or the first batch asked of a Ray Data pipeline): the driver then mostly waits
    on Ray, with a core to spare on a small machine; any earlier, the thread shares the driver's
    one busy core under the GIL (connecting to Ray, planning the job). The stage's own import of
    the same module afterwards waits for this one instead of starting over."""
    threading.Thread(target=lambda: [importlib.import_module(m) for m in modules], daemon=True).start()
