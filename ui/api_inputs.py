"""Guards of the stateless API in front of Gradio.

The API's events run with `preprocess=False` (see `ui.layout.StudioUI._api_endpoints`): Gradio's Textbox
would turn 123 into "123", a Number with a precision would round 1.5 to 2 and true to 1, and a File input
leaves an empty temporary file per call, all before the handler could refuse anything. Without
preprocessing the handlers get the values as sent (uploads still checked and cached by Gradio) and
`img_core.settings` checks them with a message for the client. What Gradio still answers with a bare
"Error" is a call with too few values; `MissingValuesAsNone` (installed by app.py) passes None for the
missing ones, which the handlers refuse with a sentence.
"""

from __future__ import annotations

import json

import gradio as gr


class MissingValuesAsNone:
    """ASGI middleware: a queued call (`/gradio_api/queue/join`) that sends fewer values than its event
    takes gets None for the missing ones, so the handler's checks answer it with a sentence ("the seed is
    missing: ...") instead of Gradio's bare "Error" (Gradio refuses short calls after queueing them and
    shows the reason to nobody). Everything else, authentication included, is Gradio's as before."""

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
        body = self.padded(b"".join(chunks))
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

    def padded(self, body: bytes) -> bytes:
        """`body` with its data padded with None up to the event's number of inputs (unchanged otherwise)."""
        try:
            call = json.loads(body)
            data, fn = call["data"], self.blocks.fns[int(call["fn_index"])]
        except (ValueError, KeyError, TypeError):
            return body
        if not isinstance(data, list) or len(data) >= len(fn.inputs):
            return body
        return json.dumps({**call, "data": data + [None] * (len(fn.inputs) - len(data))}).encode()
