"""The one input guard in front of every API route of Gradio, and the login throttle.

The API's events run with `preprocess=False` (see `ui.layout.StudioUI._api_endpoints`): Gradio's Textbox
would turn 123 into "123", a Number with a precision would round 1.5 to 2 and true to 1, and a File input
leaves an empty temporary file per call, all before the handler could refuse anything. Without
preprocessing the handlers get the values as sent (uploads still checked and cached by Gradio) and
`img_core.settings` checks them with a message for the client. What Gradio still refuses itself, with a
bare "Error" (or `{"error": null}`) and a traceback in the server log, is a call with too few values, a
file input that is not an uploaded file (a path as text), or a file record naming a file outside the
upload folder (`/etc/hostname`, a URL). `ApiInputGuard` (installed by app.py) passes None for those, on
every route that starts an event (GUARDED_ROUTES: the queue, `/call/*` REST, `/run/*`), so the
handlers refuse them with the same sentence everywhere ("the seed is missing: ...", "no image was
given: ...").

`LoginThrottle` slows down password guessing with `--auth`: one try per client address is checked at a
time, and after FREE_LOGIN_FAILURES wrong logins from one address each further try must wait twice as long
as the one before (up to MAX_LOGIN_DELAY_S); a try too early gets HTTP 429 with the seconds left.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

# POST routes that start an event, and how each names it: by fn_index in the body, or by api_name in the path.
QUEUE_JOIN = re.compile(r"/queue/join/?$")
NAMED_CALL = re.compile(r"/(?:call|call/v2|run|api)/(?P<api_name>[^/]+)/?$")
FREE_LOGIN_FAILURES = 5  # wrong logins per client address before the delay starts
FIRST_LOGIN_DELAY_S = 1.0  # then 1, 2, 4, ... seconds between tries
MAX_LOGIN_DELAY_S = 60.0  # at most one guess a minute, and a real user waits at most this long
LOGIN_MEMORY_S = 3600.0  # failures older than this are forgotten
BUSY_LOGIN_WAIT_S = 1.0  # the wait a try is told while another try from its address is being checked


class ApiInputGuard:
    """ASGI middleware: on every route that starts an event, missing values become None (also the named
    values of `/call/v2/NAME`), and so do file inputs that are not Gradio file records and file records
    outside the upload folder; the handler's checks then answer with a sentence instead of Gradio's bare
    "Error" (or an HTTP 500 with a traceback in the log). A call to an endpoint that does not exist gets
    HTTP 404 naming the ones that do. Everything else, authentication included, is Gradio's as before."""

    def __init__(self, app, blocks: gr.Blocks):
        self.app = app
        self.blocks = blocks
        self._parameters: dict[str, list[str]] = {}  # api_name -> its named values without a default (v2)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        named = NAMED_CALL.search(path)
        if not QUEUE_JOIN.search(path) and not named:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        api_name = named.group("api_name") if named else None
        body = b"".join(chunks)
        unknown = self.unknown_endpoint(body, api_name)
        if unknown is not None:
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps({"detail": unknown}).encode()})
            return
        body = self.repaired(body, api_name, "/call/v2/" in path)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def unknown_endpoint(self, body: bytes, api_name: str | None) -> str | None:
        """The sentence for a call to an endpoint this app does not have (by name, or a queue call's
        fn_index), else None."""
        if api_name is not None:
            if self.function_named(api_name) is not None:
                return None
        else:
            try:
                index = json.loads(body)["fn_index"]
            except (ValueError, KeyError, TypeError):
                return None  # not a call this guard understands: Gradio answers it
            if not isinstance(index, int) or index in self.blocks.fns:
                return None
            api_name = f"fn_index {index}"
        public = sorted(f"/{fn.api_name}" for fn in self.blocks.fns.values()
                        if fn.api_name and fn.api_visibility == "public")
        return f"this app has no API endpoint {api_name!r}; its endpoints are {', '.join(public)}"

    def repaired(self, body: bytes, api_name: str | None = None, named_values: bool = False) -> bytes:
        """`body` with its values repaired (see the class); unchanged when there is nothing to repair or
        it is not a call this guard understands (Gradio then answers it as before)."""
        try:
            call = json.loads(body)
            if named_values:  # /call/v2: {"name": value, ...}
                values = {name: allowed_file(value) for name, value in call.items()}
                for name in self.required_parameters(api_name):
                    values.setdefault(name, None)
                return body if values == call else json.dumps(values).encode()
            data = call["data"]
            fn = self.blocks.fns[int(call["fn_index"])] if api_name is None else self.function_named(api_name)
        except (ValueError, KeyError, TypeError, AttributeError):
            return body
        if fn is None or not isinstance(data, list):
            return body
        values = [allowed_file(value) for value in data] + [None] * (len(fn.inputs) - len(data))
        for index, component in enumerate(fn.inputs):
            if isinstance(component, gr.File) and values[index] is not None and not is_file_record(values[index]):
                values[index] = None
        return body if values == data else json.dumps({**call, "data": values}).encode()

    def function_named(self, api_name: str):
        """The event whose api_name is `api_name`, or None."""
        return next((fn for fn in self.blocks.fns.values() if fn.api_name == api_name), None)

    def required_parameters(self, api_name: str | None) -> list[str]:
        """The names `/call/v2/api_name` must be given (Gradio's API info: those without a default)."""
        if api_name not in self._parameters:
            endpoint = self.blocks.get_api_info(all_endpoints=True)["named_endpoints"].get(f"/{api_name}", {})
            self._parameters[api_name] = [parameter["parameter_name"] for parameter in endpoint.get("parameters", [])
                                          if not parameter.get("parameter_has_default")]
        return self._parameters[api_name]


def is_file_record(value: object) -> bool:
    """Whether `value` is what gradio_client's handle_file sends (Gradio checks the rest)."""
    return isinstance(value, dict) and isinstance(value.get("meta"), dict) and value["meta"].get("_type") == \
        "gradio.FileData"


def allowed_file(value: object) -> object:
    """`value`, or None for a file record that names no file in Gradio's upload folder (another path on
    the server, a URL): Gradio would refuse it with a bare error."""
    if not is_file_record(value):
        return value
    path = value.get("path")
    if not isinstance(path, str) or not path:
        return None
    try:
        Path(path).resolve().relative_to(Path(get_upload_folder()).resolve())
    except (ValueError, OSError):
        return None
    return value


class LoginThrottle:
    """ASGI middleware in front of Gradio's `/login`: one login try per client address is checked at a
    time (a try that comes while another from the same address is being checked gets HTTP 429, so a
    parallel burst cannot slip past the count); wrong logins (HTTP 400) are counted per address, and a try
    that comes before the address's delay has passed gets HTTP 429."""

    def __init__(self, app):
        self.app = app
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures, time of the last)
        self._checking: set[str] = set()  # addresses with a login try being checked now
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.admit(address)
        if wait > 0:
            message = json.dumps({"detail": f"Too many login tries: try again in {wait:.0f} s."}).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", str(int(wait + 0.999)).encode())]})
            await send({"type": "http.response.body", "body": message})
            return

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                self.record(address, success=message["status"] < 400)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            with self._lock:
                self._checking.discard(address)

    def admit(self, address: str, now: float | None = None) -> float:
        """0 when `address` may try a login now (it then holds its one try being checked until the answer),
        else the seconds it must wait: its delay, or BUSY_LOGIN_WAIT_S while another of its tries runs."""
        with self._lock:
            if address in self._checking:
                return BUSY_LOGIN_WAIT_S
            wait = self._seconds_to_wait(address, time.monotonic() if now is None else now)
            if wait == 0:
                self._checking.add(address)
            return wait

    def seconds_to_wait(self, address: str, now: float | None = None) -> float:
        """How long `address` must wait before its next login try (0: it may try now)."""
        with self._lock:
            return self._seconds_to_wait(address, time.monotonic() if now is None else now)

    def _seconds_to_wait(self, address: str, now: float) -> float:
        failures, last = self._failures.get(address, (0, 0.0))
        if failures < FREE_LOGIN_FAILURES:
            return 0.0
        delay = min(FIRST_LOGIN_DELAY_S * 2 ** (failures - FREE_LOGIN_FAILURES), MAX_LOGIN_DELAY_S)
        return max(0.0, last + delay - now)

    def record(self, address: str, success: bool, now: float | None = None) -> None:
        """Count a wrong login of `address` (a right one clears its count)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for old in [a for a, (_, last) in self._failures.items() if now - last > LOGIN_MEMORY_S]:
                del self._failures[old]
            if success:
                self._failures.pop(address, None)
            else:
                failures, _ = self._failures.get(address, (0, 0.0))
                self._failures[address] = (failures + 1, now)
