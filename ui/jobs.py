"""The page's model jobs: what each button runs, in a worker beside the page, with Stop and error tiers.

`Jobs.run(action, inputs, tab)` runs one click (Generate, Use your image, Critique, Refine, Auto-refine)
of one browser tab and yields `JobUpdate`s: plain values (a status line, a new state, the critique so
far), never Gradio components, which `ui.layout` maps onto the page. It knows three error tiers: Stop
(the rounds made so far are kept), a user mistake (`IMGError`: one log line and a warning), and a real
failure (the traceback goes to the log, the page says what to try). The last update always says the
job is over, so the page re-enables its buttons whatever happened.

Each tab has a ticket (`Jobs.queued`, taken the moment a job is clicked, before it waits in the GPU
queue): Stop sets it, so a job stopped while it still waits ends without running (`Jobs.run` looks at
it first), and `Jobs.busy` says that the tab has a job queued or running.

`run_in_worker` runs a job in a thread and hands its stage events over in batches (live status, the
critique streamed token by token, Stop at the next stage event).
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from img_core.errors import IMGError
from img_core.session import Stage, StageCallback, StageEvent
from ui import views
from ui.gpu import on_zero_gpu
from ui.handlers import ModelPreparation, Studio
from ui.shutdown import running_calls
from ui.state import RoundRequest, StudioState, critique_edited, effective_guidance

logger = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.25  # how often a waiting job looks whether Stop was clicked
STOPPED_NOTE = "Stopped. The rounds made so far are kept."
STOPPED_IN_QUEUE_NOTE = "Stopped while it waited in the queue: nothing ran, your rounds are as they were."

# The page's model jobs and the name each has in messages.
ACTIONS = {
    "generate": "Generate",
    "use_upload": "Use your image",
    "critique": "Critique",
    "refine": "Refine",
    "auto_refine": "Auto-refine",
}


class StopRequested(Exception):
    """The user clicked Stop: the job ends at its next stage event; finished rounds are kept."""


@dataclass(frozen=True)
class Produced:
    """A value a job produced (a state, a critique), as opposed to a StageEvent."""

    value: Any


@dataclass(frozen=True)
class JobInputs:
    """What a job reads from the page, by name (raw widget values; `Jobs.run` checks them)."""

    state: StudioState
    prompt: Any = None
    seed: Any = None
    steps: Any = None
    guidance_scale: Any = None
    ip_scale: Any = None
    aligner_passes: Any = None
    guidance_mode: str = "auto"
    critique: str | None = None
    mllm_critique: str = ""  # what the MLLM wrote for the base (Critique); the box holding more is an edit
    auto_rounds: Any = None
    upload: Any = None
    stop_when_flat: bool = True


@dataclass(frozen=True)
class JobUpdate:
    """One update of the page during a job. `status`: the stage line (or, when `finished`, the final note;
    None: none); `state`: new rounds; `critique`: text for the critique box; `request`: the click's checked
    request (the next-round note uses its prompt, so the prompt is checked once per click); `finished`: the
    job is over (re-enable the buttons); `mllm_critique`: what Critique wrote."""

    status: str | None = None
    state: StudioState | None = None
    critique: str | None = None
    request: RoundRequest | None = None
    mllm_critique: str | None = None  # the MLLM's critique of the base, just written
    finished: bool = False


@dataclass(eq=False)
class Ticket:
    """One clicked job of one tab, from the click (it waits in the GPU queue) to its end."""

    tab: str
    stop: threading.Event = field(default_factory=threading.Event)


class Jobs:
    """Runs the model jobs of every browser tab against one `Studio`, and keeps the line of jobs waiting
    for the GPU (a tab's jobs start in the order they were clicked: Gradio's queue is first in, first out)."""

    def __init__(self, studio: Studio, preparation: ModelPreparation):
        self.studio = studio
        self.preparation = preparation
        self._waiting: list[Ticket] = []  # clicked, not started, oldest first
        self._running: dict[str, Ticket] = {}
        self._lock = threading.Lock()

    # --- the line of jobs ---------------------------------------------------------------------------

    def queued(self, tab: str) -> None:
        """A job of `tab` was clicked: it waits in the GPU queue from now on (Stop from here on ends it)."""
        with self._lock:
            self._waiting.append(Ticket(tab))

    def busy(self, tab: str) -> bool:
        """`tab` has a job running, or waiting and not stopped."""
        with self._lock:
            return tab in self._running or any(t.tab == tab and not t.stop.is_set() for t in self._waiting)

    def waiting(self, tab: str) -> bool:
        """`tab`'s job waits in the queue (and was not stopped)."""
        return self.jobs_ahead(tab) is not None

    def jobs_ahead(self, tab: str) -> int | None:
        """How many jobs run or wait before `tab`'s waiting job; None when it has none waiting. A running
        API call (/generate, /critique, /refine share the GPU queue) counts too; API calls still waiting in
        Gradio's queue do not (they are not seen before they start)."""
        with self._lock:
            ahead = max(len(self._running), running_calls())
            for ticket in self._waiting:
                if ticket.stop.is_set():
                    continue
                if ticket.tab == tab:
                    return ahead
                ahead += 1
        return None

    def stop(self, tab: str) -> bool:
        """Stop `tab`'s jobs: a waiting one ends without running, a running one at its next step. True when
        a waiting job was stopped (the page can say so at once)."""
        with self._lock:
            waiting = [t for t in self._waiting if t.tab == tab and not t.stop.is_set()]
            for ticket in waiting:
                ticket.stop.set()
            running = self._running.get(tab)
        if running is not None:
            running.stop.set()
        return bool(waiting) and running is None

    def forget_waiting(self, tab: str) -> None:
        """Gradio refused `tab`'s job before it ran (its message is shown): it waits no more."""
        with self._lock:
            self._waiting = [t for t in self._waiting if t.tab != tab]

    def end(self, tab: str) -> None:
        """The tab is gone: stop its jobs and forget the waiting ones."""
        self.stop(tab)
        self.forget_waiting(tab)

    def _start(self, tab: str) -> Ticket:
        """The ticket of `tab`'s job starting now: its oldest waiting one, or a fresh one for a job that
        came without the click step (an API client calling the event directly)."""
        with self._lock:
            ticket = next((t for t in self._waiting if t.tab == tab), None) or Ticket(tab)
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._running[tab] = ticket
            return ticket

    def _finish(self, ticket: Ticket) -> None:
        with self._lock:
            if self._running.get(ticket.tab) is ticket:
                del self._running[ticket.tab]

    # --- running a job ------------------------------------------------------------------------------

    def run(self, action: str, inputs: JobInputs, tab: str) -> Iterator[JobUpdate]:
        """Run `action` (a key of ACTIONS) for `tab` and yield what the page shows; never raises."""
        name = ACTIONS[action]
        ticket = self._start(tab)
        stop = ticket.stop
        state = inputs.state
        note = None
        streamed = False  # the critique box shows text of a round that may not finish
        checked: RoundRequest | None = None
        shown_warnings: set[str] = set()

        def warn(messages: Iterable[str]) -> None:
            for message in messages:
                if message not in shown_warnings:
                    shown_warnings.add(message)
                    gr.Warning(views.public_text(message))

        if stop.is_set():  # Stopped while it waited in the queue: the page said so then; nothing to show
            self._finish(ticket)
            yield JobUpdate()
            return
        try:
            checked = round_request(inputs)
            warn(checked.warnings)
            auto = _auto_rounds(inputs) if action == "auto_refine" else None
            produce = self._producer(action, inputs)
            if on_zero_gpu():  # the job runs in a forked worker: no callback crosses; results at the end
                batches = [[Produced(value) for value in produce(checked, None)]]
            else:
                request = checked
                batches = run_in_worker(lambda on_stage: produce(request, on_stage), stop)
            first_new = state.next_index
            for batch in batches:
                status = critique = changed = written = None
                for item in batch:
                    if isinstance(item, StageEvent):
                        if item.stage == Stage.LOAD:
                            self.preparation.note(item)
                        where = (first_new, auto) if auto else None
                        status = views.stage_line(item, self.preparation.step_text or None, where)
                        if item.text is not None:
                            critique, streamed = item.text, True
                        continue
                    value = item.value
                    if isinstance(value, tuple):  # Auto-refine: (state, why it stopped early)
                        value, note = value
                    streamed = False
                    if isinstance(value, StudioState):
                        state = changed = value
                        warn(state.base_round().warnings)
                    elif isinstance(value, str):  # the MLLM's critique of the base: an edit is anything else
                        critique = written = value
                yield JobUpdate(status, changed, critique, checked, mllm_critique=written)
        except StopRequested:
            note = STOPPED_NOTE
            gr.Info(note)
        except IMGError as error:  # the user can fix it: one log line, a message on the page
            logger.warning("%s refused: %s", name, error)
            note = views.public_text(f"⚠️ {error}")
            gr.Warning(views.public_text(str(error)))
        except Exception as error:  # a real failure: traceback in the log, the page stays usable
            logger.exception("%s failed", name)
            note = views.public_text(
                f"⚠️ {name} failed ({type(error).__name__}: {error}). The rounds so far are kept; try again, "
                "or with fewer steps or a smaller preset."
            )
            gr.Warning(note)
        finally:
            self._finish(ticket)
        if note and note.startswith("Auto-refine stopped"):
            gr.Info(note)
        # A critique streamed for a round that did not finish: back to the box's text for this base.
        restored = (inputs.critique or "" if state is inputs.state else "") if streamed else None
        yield JobUpdate(status=note, state=state, critique=restored, request=checked, finished=True)

    def _producer(self, action: str, inputs: JobInputs) -> Callable[[RoundRequest, StageCallback | None], Iterable]:
        """What `action` runs: a function of the checked request and the stage callback that yields states,
        critiques, or (state, stop reason) pairs."""
        studio, state = self.studio, inputs.state
        if action == "generate":
            return lambda request, on_stage: [studio.generate(request, state, on_stage)]
        if action == "use_upload":
            return lambda request, on_stage: [studio.start_from_image(inputs.upload, request, state, on_stage)]
        if action == "critique":
            return lambda request, on_stage: [studio.critique(request, state, on_stage)]
        edited = critique_edited(inputs.critique, inputs.mllm_critique)
        if action == "refine":
            return lambda request, on_stage: [studio.refine(request, state, inputs.critique, on_stage, edited=edited)]
        if action == "auto_refine":
            later = "question" if inputs.guidance_mode in (None, "", "auto") else None  # no edit steers those
            return lambda request, on_stage: studio.auto_refine(
                request, state, inputs.critique, inputs.auto_rounds, bool(inputs.stop_when_flat), on_stage,
                edited=edited, later_mode=later,
            )
        raise ValueError(f"unknown job {action!r}")


def round_request(inputs: JobInputs) -> RoundRequest:
    """The click's settings, checked once (the prompt included); "auto" guidance resolved (`ui.state`)."""
    return RoundRequest.from_values(
        prompt=inputs.prompt,
        seed=inputs.seed,
        steps=inputs.steps,
        max_critique_tokens=None,
        guidance_scale=inputs.guidance_scale,
        ip_scale=inputs.ip_scale,
        aligner_passes=inputs.aligner_passes,
        guidance_mode=effective_guidance(inputs.guidance_mode, inputs.critique, inputs.mllm_critique),
    )


def _auto_rounds(inputs: JobInputs) -> int | None:
    try:
        return int(inputs.auto_rounds)
    except (TypeError, ValueError):
        return None  # the handler refuses it with a message


def run_in_worker(
    produce: Callable[[StageCallback], Iterable[Any]], stop: threading.Event | None = None
) -> Iterator[list[StageEvent | Produced]]:
    """Run `produce(on_stage)` in a worker thread and yield what it reports, in batches: every
    StageEvent and every value it yields (as `Produced`) since the last batch. The caller turns each
    batch into one page update, so a fast stream of steps or tokens never floods the page. When `stop`
    is set, the next stage event raises StopRequested inside the job. An exception of the job is
    raised here, after the batches before it. The worker runs in a copy of the caller's context, so
    gr.Warning works inside it."""
    items: queue.Queue = queue.Queue()
    done = object()

    def on_stage(event: StageEvent) -> None:
        if stop is not None and stop.is_set():
            raise StopRequested("stopped by the user")
        items.put(event)

    def work() -> None:
        try:
            for value in produce(on_stage):
                items.put(Produced(value))
                if stop is not None and stop.is_set():
                    raise StopRequested("stopped by the user")
        except BaseException as error:  # handed to the caller's thread, which decides
            items.put(error)
        finally:
            items.put(done)

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="img-studio-job", daemon=True)
    worker.start()
    finished = False
    announced = False  # the page was told that the job is stopping
    try:
        while not finished:
            try:
                batch = [items.get(timeout=STOP_POLL_SECONDS)]
            except queue.Empty:
                if stop is not None and stop.is_set() and not announced:
                    announced = True
                    yield [StageEvent(Stage.STOPPING)]  # at once, even while a long step runs
                continue
            while True:
                try:
                    batch.append(items.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is done:
                batch.pop()
                finished = True
            failures = [item for item in batch if isinstance(item, BaseException)]
            reported = [item for item in batch if not isinstance(item, BaseException)]
            if reported:
                yield reported
            if failures:
                worker.join()
                raise failures[0]
        worker.join()
    finally:
        if not finished and stop is not None:  # the page went away mid-job: end it at its next step
            stop.set()
