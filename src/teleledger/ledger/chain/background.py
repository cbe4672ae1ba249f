"""One background thread per chain component (outbox worker, indexer, anchorer).

A component subclasses ``BackgroundThread``, calls ``_init_thread(name, what)`` in its
constructor and implements ``_run``, a loop that ends once ``self._stop`` is set (waiting with
``self._stop.wait(...)`` so that ``stop()`` interrupts a sleep). ``_before_start`` and
``_after_stop`` are hooks for what a component must attach and detach around its thread.
"""

from __future__ import annotations

import threading


class BackgroundThread:
    _stop: threading.Event
    _thread: threading.Thread | None

    def _init_thread(self, name: str, what: str) -> None:
        self._stop = threading.Event()
        self._thread = None
        self._thread_name = name
        self._thread_what = what

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self._thread_what} is already running")
        self._stop.clear()
        self._before_start()
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._after_stop()

    def _run(self) -> None:
        raise NotImplementedError

    def _before_start(self) -> None:
        """Attach what the thread needs (called before it starts)."""

    def _interrupt(self) -> None:
        """Wake the thread from any wait of its own besides ``self._stop``."""

    def _after_stop(self) -> None:
        """Detach what ``_before_start`` attached (called after the thread ended)."""
