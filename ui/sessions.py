"""Per-session memory that ends with the session.

Gradio keeps a `SessionState` per session hash (a copy of the page's configuration, ~100 KB) for up to
`state_session_capacity` sessions (10000 by default: about 1 GB). Every call of the stateless API
(`/generate`, `/critique`, `/refine`) from a new client is a new session that never comes back, so the
app's memory grew with the number of API clients. `SessionSweeper` removes, every SWEEP_SECONDS, the
sessions idle for IDLE_SECONDS that hold no value of a `gr.State` (API sessions, and page sessions
that never made a round) and have no event in the queue; a page session with rounds is kept until
Gradio ends it (its tab closed). SESSION_CAPACITY (app.py passes it to `launch`) bounds the rest.

This reads Gradio's `StateHolder` (`blocks.state_holder.session_data`, `time_last_used`, its lock) and
the queue's pending events: Gradio has no public way to end a session.
"""

from __future__ import annotations

import datetime
import logging
import threading

import gradio as gr

logger = logging.getLogger(__name__)

IDLE_SECONDS = 120.0  # an API session unused this long is removed
SWEEP_SECONDS = 30.0
SESSION_CAPACITY = 2000  # sessions Gradio keeps at most (oldest removed first): ~200 MB at ~100 KB each


def remove_idle_sessions(demo: gr.Blocks, idle_seconds: float = IDLE_SECONDS) -> int:
    """Remove the idle sessions without state or queued events; returns how many."""
    holder = demo.state_holder
    queue = getattr(demo, "_queue", None)
    pending = getattr(queue, "pending_event_ids_session", {}) if queue is not None else {}
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=idle_seconds)
    removed = 0
    with holder.lock:
        for session_hash in list(holder.session_data):
            session = holder.session_data.get(session_hash)
            last_used = holder.time_last_used.get(session_hash)
            if session is None or session.state_data or pending.get(session_hash):
                continue
            if last_used is None or last_used < cutoff:
                del holder.session_data[session_hash]
                holder.time_last_used.pop(session_hash, None)
                removed += 1
    return removed


class SessionSweeper:
    """A daemon thread that calls `remove_idle_sessions` every SWEEP_SECONDS."""

    def __init__(self, demo: gr.Blocks, idle_seconds: float = IDLE_SECONDS, every: float = SWEEP_SECONDS):
        self.demo, self.idle_seconds, self.every = demo, idle_seconds, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="img-studio-sessions", daemon=True)

    def start(self) -> SessionSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                removed = remove_idle_sessions(self.demo, self.idle_seconds)
            except Exception:  # never let the sweeper die: memory would grow again, silently
                logger.exception("removing idle sessions failed")
                continue
            if removed:
                logger.debug("removed %d idle sessions", removed)
