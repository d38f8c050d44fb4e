"""Small helpers shared across segtrain."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` in a daemon thread: its result, its exception re-raised here, or ``TimeoutError`` after
    ``timeout`` seconds (the thread is then abandoned).  For network calls whose own timeouts do not cover
    every stage (``urlopen`` does not time out name resolution), so that offline fails in seconds."""
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
