"""Guards of the stateless API in front of Gradio.

The API's events run with `preprocess=False` (see `ui.layout.StudioUI._api_endpoints`): Gradio's Textbox
would turn 123 into "123", a Number with a precision would round 1.5 to 2 and true to 1, and a File input
leaves an empty temporary file per call, all before the handler could refuse anything. Without
preprocessing the handlers get the values as sent (uploads still checked and cached by Gradio) and
`img_core.settings` checks them with a message for the client. What Gradio still answers with a bare
"Error" is a call with too few values or a file input that is not an uploaded file (a path as text);
`MalformedValuesAsNone` (installed by app.py) passes None for those, which the handlers refuse with a
sentence ("the seed is missing: ...", "no image was given: ...").
"""

from __future__ import annotations

import json

import gradio as gr


class MalformedValuesAsNone:
    """ASGI middleware for queued calls (`/gradio_api/queue/join`): missing values, and file inputs that
    are not Gradio file records, become None, so the handler's checks answer them with a sentence instead
    of Gradio's bare "Error" (Gradio refuses such calls after queueing them and shows the reason to
    nobody). Everything else, authentication included, is Gradio's as before."""

    def __init__(self, app, blocks: gr.Blocks):
        self.app = app
        self.blocks = blocks

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/queue/join"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = self.repaired(b"".join(chunks))
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

    def repaired(self, body: bytes) -> bytes:
        """`body` with its data padded with None up to the event's number of inputs and None for file
        inputs that are not file records (unchanged when there is nothing to repair)."""
        try:
            call = json.loads(body)
            data, fn = call["data"], self.blocks.fns[int(call["fn_index"])]
        except (ValueError, KeyError, TypeError):
            return body
        if not isinstance(data, list):
            return body
        values = data + [None] * (len(fn.inputs) - len(data))
        for index, component in enumerate(fn.inputs):
            if isinstance(component, gr.File) and values[index] is not None and not is_file_record(values[index]):
                values[index] = None
        return body if values == data else json.dumps({**call, "data": values}).encode()


def is_file_record(value: object) -> bool:
    """Whether `value` is what gradio_client's handle_file sends (Gradio checks the rest)."""
    return isinstance(value, dict) and isinstance(value.get("meta"), dict) and value["meta"].get("_type") == \
        "gradio.FileData"
