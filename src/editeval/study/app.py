"""The raters' web app: server-rendered pages with plain HTML forms (FastAPI; no JavaScript, no
build step).

Routes (``TOKEN`` is a rater's private link secret):

- ``GET /r/TOKEN``: the rater's next page: the source image, the task and the instruction, and the
  edits to rate as "Edit A", "Edit B", ... (never the method), each on the four factors 1-10; or a
  thank-you page when their work is done. Progress is shown; the link works again later.
- ``POST /r/TOKEN/rate``: stores the page's ratings at once (:meth:`StudyStore.record_unit`), then
  redirects (303) to the next page.
- ``GET /r/TOKEN/edit/KEY`` and ``GET /r/TOKEN/source/KEY``: an edit assigned to this rater and
  its source image (PNG).

Security: an unknown link gets a plain 404, a revoked one a plain 403; a rater reads only their
own pages and images and writes only their own ratings; a POST must carry the rater's form token
(``csrf``, compared in constant time) and come from this server's own origin (``Origin``, else
``Referer``, must match the ``Host`` the request was sent to), so another site cannot submit
ratings through a rater's browser; every field is validated (known edit keys of the page, the
four factors as integers 1-10). Pages are sent with ``no-store``, a strict Content Security Policy
(no scripts, no framing) and ``Referrer-Policy: same-origin``.
"""

from __future__ import annotations

import html
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.concurrency import run_in_threadpool

from editeval.core.lmm_score import FACTORS
from editeval.run import Run
from editeval.study.store import Rater, RatingRefused, StudyStore

MAX_FORM_BYTES = 64 * 1024

FACTOR_HELP = {
    "accuracy": "Editing accuracy: how well the edit does what the instruction asks.",
    "preservation": "Contextual preservation: what should not change stays as it was.",
    "quality": "Visual quality: sharp, clean, free of artefacts.",
    "realism": "Logical realism: physically plausible (lighting, shadows, proportions).",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 70rem; padding: 0 1rem;
       color: #222; }
header { display: flex; gap: 1rem; align-items: center; justify-content: space-between; }
progress { width: 16rem; height: 1rem; }
.task { font-size: 1.1rem; margin: .8rem 0; }
.instruction { font-size: 1.2rem; font-weight: 600; }
.images { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; }
figure { margin: 0; padding: .6rem; border: 1px solid #ccc; border-radius: .4rem; }
figure.source { background: #f4f4f4; }
figure img { width: 256px; height: auto; image-rendering: pixelated; display: block; }
figcaption { font-weight: 600; margin: .4rem 0; }
label { display: flex; justify-content: space-between; gap: .6rem; margin: .25rem 0; }
.help { color: #555; font-size: .9rem; margin: .2rem 0; }
button { font-size: 1.1rem; padding: .5rem 1.5rem; margin-top: 1rem; }
"""

OPTIONS = "".join(f"<option>{v}</option>" for v in range(1, 11))
NOT_FOUND = "This rater link is not valid. Ask the study's organiser for your link."
REVOKED = "This rater link has been revoked. Ask the study's organiser if this is a mistake."


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><link rel='stylesheet' href='/style.css'></head>"
        f"<body>{body}</body></html>", status_code=status)


def _refusal(status: int, message: str) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status)


def _same_origin(request: Request) -> bool:
    """The request's Origin (else Referer) names the host it was sent to."""
    host = request.headers.get("host")
    source = request.headers.get("origin") or request.headers.get("referer")
    if not host or not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc == host


class SecurityHeaders:
    """ASGI middleware: :data:`SECURITY_HEADERS` on every response."""

    def __init__(self, app) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(run_dir: str | os.PathLike) -> FastAPI:
    """The study app of the run in ``run_dir`` (its study made by ``editeval study add-raters``).

    Raises:
        NotARunError: ``run_dir`` is not a run directory.
    """
    run = Run.open(run_dir)
    store = StudyStore(run)
    rows = {row.job_id: row for row in run.rows("done")}
    samples = run.samples
    run.close()  # the results are read once; the study's own connection serves every thread

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="editeval study", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.add_middleware(SecurityHeaders)

    def rater_or_refusal(token: str) -> Rater | PlainTextResponse:
        rater = store.rater_by_token(token)
        if rater is None:
            return _refusal(404, NOT_FOUND)
        if rater.revoked_at is not None:
            return _refusal(403, REVOKED)
        return rater

    @app.get("/", response_class=PlainTextResponse)
    def index() -> str:
        return "editeval user study: open the personal link you were given.\n"

    @app.get("/favicon.ico")
    def favicon() -> Response:  # browsers ask for one; "no icon" is not an error
        return Response(status_code=204)

    @app.get("/style.css")
    def style() -> Response:
        return Response(STYLE, media_type="text/css")

    # Reads call the store directly: its queries take well under a millisecond (WAL reads never
    # wait) and a thread hop would cost more; a write, which may wait for another writer of the
    # run's store, runs in the thread pool.
    @app.get("/r/{token}")
    async def rating_page(token: str) -> Response:
        rater = rater_or_refusal(token)
        if not isinstance(rater, Rater):
            return rater
        progress = store.progress(rater.rater_id)
        bar = (f"<header><h1>Rating edited images</h1><div><progress max='{progress.total}' "
               f"value='{progress.done}'></progress> <span id='progress'>{progress.done} of "
               f"{progress.total} done</span></div></header>")
        if progress.next_unit is None:
            return _page("Thank you", bar + "<p id='done'>All your pages are rated. Thank you! "
                         "You can close this window.</p>")
        edits = store.unrated_edits(rater.rater_id, progress.next_unit)
        sample = samples[rows[edits[0].job_id].sample_id]
        request_text = sample.instruction or sample.target_prompt
        base = f"/r/{token}"
        figures = [f"<figure class='source'><img src='{base}/source/{edits[0].edit_key}' "
                   f"alt='source image'><figcaption>Source image</figcaption></figure>"]
        for letter, edit in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", edits):
            selects = "".join(
                f"<label>{factor.capitalize()} <select name='{edit.edit_key}.{factor}' required>"
                f"<option value=''>-</option>{OPTIONS}</select></label>" for factor in FACTORS)
            figures.append(f"<figure><img src='{base}/edit/{edit.edit_key}' alt='Edit {letter}'>"
                           f"<figcaption>Edit {letter}</figcaption>{selects}</figure>")
        help_text = "".join(f"<p class='help'>{html.escape(text)}</p>"
                            for text in FACTOR_HELP.values())
        body = (bar
                + f"<p class='task'>Task: {html.escape(sample.task.replace('_', ' '))}</p>"
                + f"<p class='instruction'>{html.escape(request_text)}</p>"
                + "<p>Rate each edit from 1 (worst) to 10 (best) on the four factors. Your ratings "
                  "are saved when you press Save; you can leave and come back to this link.</p>"
                + help_text
                + f"<form method='post' action='{base}/rate'>"
                + f"<input type='hidden' name='csrf' value='{rater.csrf}'>"
                + f"<div class='images'>{''.join(figures)}</div>"
                + "<button type='submit'>Save and continue</button></form>")
        return _page(f"Rating {progress.done + 1} of {progress.total}", body)

    @app.post("/r/{token}/rate")
    async def rate(token: str, request: Request) -> Response:
        rater = rater_or_refusal(token)
        if not isinstance(rater, Rater):
            return rater
        if not _same_origin(request):
            return _refusal(403, "Cross-site form refused: the request did not come from this "
                                 "study's own page.")
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return _refusal(413, "Form too large.")
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True,
                              strict_parsing=bool(body), max_num_fields=2000)
        except (UnicodeDecodeError, ValueError):
            return _refusal(400, "Malformed form.")
        if any(len(values) != 1 for values in fields.values()):
            return _refusal(400, "Each field must be given once.")
        form = {name: values[0] for name, values in fields.items()}
        if not secrets.compare_digest(form.pop("csrf", "").encode(), rater.csrf.encode()):
            return _refusal(403, "Missing or wrong form token: reload your rating page.")
        ratings: dict[str, dict[str, str]] = {}
        for name, value in form.items():
            key, _, factor = name.rpartition(".")
            if not key:
                return _refusal(400, f"Unknown field {name[:40]!r}.")
            ratings.setdefault(key, {})[factor] = value
        try:
            await run_in_threadpool(store.record_unit, rater.rater_id, ratings)
        except RatingRefused as refused:
            if refused.status == 409:
                return _page("Already rated", f"<p>You have already rated this page; your first "
                             f"ratings stand.</p><p><a href='/r/{token}'>Continue</a></p>", 409)
            return _refusal(refused.status, str(refused))
        return RedirectResponse(f"/r/{token}", status_code=303)

    def image(token: str, edit_key: str, source: bool) -> Response:
        rater = rater_or_refusal(token)
        if not isinstance(rater, Rater):
            return rater
        edit = store.edit(edit_key)
        if edit is None or not store.holds(rater.rater_id, edit.unit):
            return _refusal(404, "No such image.")
        row = rows[edit.job_id]
        return FileResponse(samples[row.sample_id].image_path if source
                            else run.image_path(row))

    @app.get("/r/{token}/edit/{edit_key}")
    def edit_image(token: str, edit_key: str) -> Response:
        return image(token, edit_key, source=False)

    @app.get("/r/{token}/source/{edit_key}")
    def source_image(token: str, edit_key: str) -> Response:
        return image(token, edit_key, source=True)

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL
    (``http://HOST:PORT``) once it accepts connections, and stops it on exit.

    Raises:
        RuntimeError: the server did not start within 20 s.
    """
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the study server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
