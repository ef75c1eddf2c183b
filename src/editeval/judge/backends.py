"""Judge backends: an OpenAI-compatible Chat Completions client, a local transformers
vision-language model, and the toy world's oracle.

Every chat request whose reply is an answer (a chat completion, or a refusal) is cached on disk
under the sha256 of its payload (model, messages with the images, temperature, seed, repeat),
request and response together, with no secret in either (the API key only ever travels in a header,
the server's address is not part of either), so rescoring costs nothing and a crash loses nothing.
Any other reply (no ``choices``, an empty or non-JSON body, an HTTP error, a timeout) is an
``error`` answer with the raw body, never cached, and asked again on a rerun.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import io
import json
import os
import random
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from editeval.data.images import load_image
from editeval.core.files import atomic_write
from editeval.core.samples import Sample
from editeval.judge.parsing import ImageScores, ParseFailure, parse_scores
from editeval.judge.protocol import SYSTEM_PROMPT, Protocol

RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}
CONNECT_TIMEOUT = 10.0  # seconds to open a connection, at most (a host that drops packets)
# what each unsuccessful answer status is, in words (the leaderboard reports each kind)
FAILURE_KINDS = {"parse_failed": "parse failure", "refused": "refusal", "error": "transport error"}
_SECRET_PARAMETER = re.compile(r"key|token|secret|passw|pwd|auth|sig|credential", re.IGNORECASE)


class BudgetExhausted(RuntimeError):
    """The run's request budget is spent; unscored items stay unscored (not failures)."""


class JudgeUnreachable(RuntimeError):
    """Connections to the judge's server keep failing: scoring cannot go on (one-line message
    naming the server's address, without credentials, and the cause)."""


def redact_url(url: str) -> str:
    """``url`` without its ``user:password@`` part, its fragment and any query parameter whose name
    looks secret (``api_key``, ``token``, ``sig``, ...); other parameters (``api-version``) stay."""
    parts = urllib.parse.urlsplit(url)
    query = [(name, value) for name, value in urllib.parse.parse_qsl(parts.query,
                                                                     keep_blank_values=True)
             if not _SECRET_PARAMETER.search(name)]
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path,
                                    urllib.parse.urlencode(query), ""))


def public_judge_name(judge: str) -> str:
    """A stored judge name (``openai:MODEL@URL``) with the URL redacted (see :func:`redact_url`);
    names without a URL are returned as they are."""
    head, at, url = judge.partition("@")
    return head + at + redact_url(url) if at and "://" in url else judge


@dataclass
class JudgeRequest:
    """One conversation: a source, its instruction and the edits to score, in the order shown."""

    sample: Sample
    images: list[Path]
    repeat: int = 0


@dataclass
class JudgeAnswer:
    """Outcome of one request. ``status``: ``ok``, ``parse_failed``, ``refused`` or ``error``;
    ``scores`` (one per image, in request order) only when ``ok``."""

    status: str  # ok, or a key of FAILURE_KINDS
    scores: list[ImageScores] | None = None
    raw: str = ""
    message: str = ""
    cache_key: str | None = None


@dataclass
class RequestBudget:
    """Counts requests actually sent (cache hits are free); ``limit`` None means unlimited."""

    limit: int | None = None
    used: int = 0

    def spend(self) -> None:
        if self.limit is not None and self.used >= self.limit:
            raise BudgetExhausted(f"request budget of {self.limit} spent")
        self.used += 1


class ResponseCache:
    """JSON files ``DIR/ab/abcdef....json`` keyed by the sha256 of the request payload."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(payload: dict) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The cached ``{"request", "response"}``, or None when absent or unreadable."""
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, request: dict, response: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"request": request, "response": response})
        atomic_write(path, lambda f: f.write(text.encode()))


def encode_image(path: str | os.PathLike, max_side: int) -> str:
    """A ``data:image/png;base64,...`` URL of the image, RGB, longest side at most ``max_side``."""
    image = load_image(path)
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _answer_from_text(text: str, n_images: int, key: str | None) -> JudgeAnswer:
    try:
        return JudgeAnswer("ok", parse_scores(text, n_images), raw=text, cache_key=key)
    except ParseFailure as failure:
        return JudgeAnswer("parse_failed", raw=text, message=failure.reason, cache_key=key)


@dataclass
class OpenAICompatibleBackend:
    """Chat Completions over HTTP: OpenAI, Azure OpenAI (v1 API), vLLM, SGLang, Ollama, LM Studio.

    Attributes:
        model: model name on the server (``gpt-4o``, ``Qwen/Qwen2-VL-7B-Instruct``, ...).
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        api_key_env: name of the environment variable holding the key (the key itself is never
            passed, logged or stored); unset is fine for local servers.
        cache: where responses are cached. budget: the shared request budget.
        temperature / seed: sent with every request (seed + repeat index).
        max_side: images are downscaled to this longest side (pixels) before encoding.
        timeout: seconds per HTTP request (the read, write and pool timeouts; connecting: at
            most ``CONNECT_TIMEOUT``).
        retry_total: seconds a request keeps being retried (timeouts, connection failures,
            408/409/429/5xx), counted from its first attempt; the default outlasts a minute-long
            rate limit.
        backoff: first retry delay in seconds (doubling up to ``max_backoff``, with jitter),
            unless the server's Retry-After says otherwise.
        unreachable_after: this many connection failures in a row before the server ever
            answered raise :class:`JudgeUnreachable` (a wrong URL stops within seconds).
        structured: also send ``response_format`` with the JSON schema (servers that support it).

    ``name`` (stored with every score) holds the base URL without credentials
    (:func:`redact_url`); requests use it as given, user info and query included.
    """

    model: str
    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    cache: ResponseCache | None = None
    budget: RequestBudget = field(default_factory=RequestBudget)
    temperature: float = 0.0
    seed: int = 0
    max_side: int = 512
    timeout: float = 120.0
    retry_total: float = 300.0
    backoff: float = 1.0
    max_backoff: float = 60.0
    unreachable_after: int = 3
    structured: bool = False
    _client: Any = None
    _responded: bool = False  # the server has answered (any HTTP status) at least once
    _connect_failures: int = 0  # connection failures in a row, over all requests

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the judge's base URL {redact_url(self.base_url)!r} (--base-url or "
                             "$OPENAI_BASE_URL) is not an http(s) URL; give the API root, e.g. "
                             "http://127.0.0.1:8000/v1")

    @property
    def name(self) -> str:
        return f"openai:{self.model}@{redact_url(self.base_url)}"

    @property
    def endpoint(self) -> str:
        """The Chat Completions URL: the base URL's path + ``/chat/completions``, its query kept."""
        parts = urllib.parse.urlsplit(self.base_url)
        return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/")
                                                      + "/chat/completions", fragment=""))

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "")
        if not key:
            return {}
        return {"api-key": key} if ".azure.com" in self.base_url else {
            "Authorization": f"Bearer {key}"}

    def payload(self, request: JudgeRequest, protocol: Protocol) -> dict:
        """The Chat Completions request body (no secrets)."""
        sample = request.sample
        content: list[dict] = [{"type": "text", "text": "SOURCE image:"},
                               {"type": "image_url", "image_url": {
                                   "url": encode_image(sample.image_path, self.max_side)}}]
        for index, path in enumerate(request.images, start=1):
            content.append({"type": "text", "text": f"Image {index}:"})
            content.append({"type": "image_url",
                            "image_url": {"url": encode_image(path, self.max_side)}})
        content.append({"type": "text", "text": protocol.prompt(
            sample.task, sample.instruction, len(request.images))})
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": content}],
            "temperature": self.temperature,
            "seed": self.seed + request.repeat,
        }
        if self.structured:
            body["response_format"] = {"type": "json_schema", "json_schema": _SCHEMA}
        return body

    async def judge(self, request: JudgeRequest, protocol: Protocol) -> JudgeAnswer:
        """The judge's answer; any reply that is not one is an ``error`` answer.

        Raises:
            BudgetExhausted: the budget was spent before this request was sent.
            JudgeUnreachable: see ``unreachable_after``.
        """
        body = await asyncio.to_thread(self.payload, request, protocol)  # image encoding
        key = ResponseCache.key({**body, "repeat": request.repeat})
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            answer = self._interpret(cached["response"], len(request.images), key)
            if answer.status != "error":  # else an older editeval cached a non-answer: ask again
                return answer
        response = await self._post(body)
        answer = self._interpret(response, len(request.images), key)
        if self.cache is not None and answer.status != "error":
            self.cache.put(key, _without_images(body), response)
        return answer

    def _interpret(self, response: dict, n_images: int, key: str) -> JudgeAnswer:
        raw = response.get("raw")
        raw = json.dumps(response.get("body")) if raw is None else raw
        if response["kind"] != "ok":
            return JudgeAnswer(response["kind"], raw=raw, message=response["message"],
                               cache_key=key)
        choice, message = _first_choice(response["body"])
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            return JudgeAnswer("refused", raw=raw,
                               message=message.get("refusal") or "finish_reason=content_filter",
                               cache_key=key)
        if not isinstance(message.get("content"), str):
            return JudgeAnswer("error", raw=raw, cache_key=key, message=(
                f"HTTP 200 from {redact_url(self.endpoint)} is not a chat completion (no "
                "choices[0].message.content)"))
        return _answer_from_text(message["content"], n_images, key)

    async def _post(self, body: dict) -> dict:
        """POST with retries for up to ``retry_total`` seconds; returns ``{"kind": "ok" |
        "refused" | "error", "body", "message"}`` (``"raw"``: the reply's text, when not ok).

        Raises:
            BudgetExhausted: before the first attempt (a retry cut short by the budget is an
                ``error``). JudgeUnreachable: see ``unreachable_after``.
        """
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(
                self.timeout, connect=min(self.timeout, CONNECT_TIMEOUT)))
        url = self.endpoint
        start = time.monotonic()
        last = ""
        attempt = 0
        while True:
            try:
                self.budget.spend()
            except BudgetExhausted:
                if attempt == 0:
                    raise
                return _error(f"the request budget was spent while retrying; last: {last}")
            attempt += 1
            sent = time.monotonic()
            retry_after = None
            connect_failed = False
            try:
                reply = await self._client.post(url, json=body, headers=self._headers())
            except httpx.TimeoutException as err:
                last = self._timeout_message(err, time.monotonic() - sent)
                connect_failed = isinstance(err, httpx.ConnectTimeout)
            except httpx.TransportError as err:  # refused, DNS failure, reset, closed early
                last = f"{type(err).__name__}: {_cause(err)}"
                connect_failed = isinstance(err, httpx.ConnectError)
            except httpx.RequestError as err:  # undecodable content, redirect loops: no retry
                return _error(f"{type(err).__name__}: {_cause(err)}")
            else:
                self._responded, self._connect_failures = True, 0
                if reply.status_code == 200:
                    return self._reply_body(reply)
                detail = _error_detail(reply)
                if reply.status_code == 400 and _is_content_filter(detail):
                    error = detail.get("error")
                    return {"kind": "refused", "body": detail, "message": str(
                        error.get("message", detail) if isinstance(error, dict) else detail)}
                last = f"HTTP {reply.status_code}: {json.dumps(detail)}"
                if reply.status_code not in RETRY_STATUSES:
                    return _error(last, reply.text)
                retry_after = _retry_after(reply.headers.get("retry-after"))
                if retry_after is not None:
                    last += f" (Retry-After: {retry_after:g} s)"
            if connect_failed:
                self._connect_failures += 1
                if not self._responded and self._connect_failures >= self.unreachable_after:
                    raise JudgeUnreachable(
                        f"cannot reach the judge at {redact_url(self.base_url)}: {last}")
            elapsed = time.monotonic() - start
            delay = retry_after if retry_after else min(
                self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random())
            if elapsed + delay > self.retry_total:
                if connect_failed and self._connect_failures >= self.unreachable_after:
                    raise JudgeUnreachable(  # it answered before; it has not for retry_total
                        f"cannot reach the judge at {redact_url(self.base_url)} for "
                        f"{elapsed:.0f} s: {last}")
                return _error(f"gave up after {attempt} attempt{'s' * (attempt > 1)} in "
                              f"{elapsed:.1f} s (retry total {self.retry_total:g} s); last: {last}")
            await asyncio.sleep(delay)

    def _reply_body(self, reply: Any) -> dict:
        """An HTTP 200 reply: ``ok`` with its JSON, or an ``error`` when the body is not JSON."""
        try:
            return {"kind": "ok", "body": reply.json(), "message": ""}
        except ValueError:
            what = "a body that is not JSON" if reply.text.strip() else "an empty body"
            return _error(f"HTTP 200 from {redact_url(self.endpoint)} with {what}", reply.text)

    def _timeout_message(self, err: Exception, elapsed: float) -> str:
        """What timed out (the URL path and which of httpx's timeouts), its limit and when."""
        which = {"ConnectTimeout": "connect", "ReadTimeout": "read", "WriteTimeout": "write",
                 "PoolTimeout": "pool"}.get(type(err).__name__, "")
        limit = min(self.timeout, CONNECT_TIMEOUT) if which == "connect" else self.timeout
        path = urllib.parse.urlsplit(self.endpoint).path
        what = {"connect": "no connection", "pool": "no free connection"}.get(which, "no data")
        return (f"{type(err).__name__}: POST {path}: {what} within the {limit:g} s {which} "
                f"timeout (gave up {elapsed:.1f} s after sending)")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


_SCHEMA = {
    "name": "lmm_scores",
    "strict": True,
    "schema": {
        "type": "object",
        "additionalProperties": False,
        "required": ["scores"],
        "properties": {"scores": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["image", "accuracy", "preservation", "quality", "realism"],
            "properties": {k: {"type": "integer"} for k in
                           ("image", "accuracy", "preservation", "quality", "realism")},
        }}},
    },
}


def _error(message: str, raw: str = "") -> dict:
    return {"kind": "error", "body": None, "message": message, "raw": raw}


def _first_choice(body: Any) -> tuple[dict, dict]:
    """``(choices[0], choices[0].message)`` of a reply body, empty dicts where absent."""
    choices = body.get("choices") if isinstance(body, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices else None
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    return choice, message if isinstance(message, dict) else {}


def _cause(err: BaseException) -> str:
    """The root cause's message (httpx wraps the OS error: "All connection attempts failed"
    hides "Connection refused"), with the OS's words for its error number; never empty."""
    found, chain = "", err
    while chain is not None:
        if str(chain):
            found = chain
        chain = chain.__cause__ or chain.__context__
    if isinstance(found, OSError) and found.errno and found.errno > 0:
        return f"{os.strerror(found.errno)} ({found})"
    return str(found) or "no detail given"


def _without_images(body: dict) -> dict:
    """The payload with each image replaced by the sha256 of its data URL (keeps caches small)."""
    def strip(part: dict) -> dict:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            return {"type": "image_url", "sha256": hashlib.sha256(url.encode()).hexdigest()}
        return part

    messages = [{**m, "content": [strip(p) for p in m["content"]]} if isinstance(m["content"], list)
                else m for m in body["messages"]]
    return {**body, "messages": messages}


def _error_detail(reply: Any) -> dict:
    try:
        detail = reply.json()
        return detail if isinstance(detail, dict) else {"error": detail}
    except ValueError:
        return {"error": reply.text[:500]}


def _is_content_filter(detail: dict) -> bool:
    error = detail.get("error", {})
    code = str(error.get("code", "") if isinstance(error, dict) else error).lower()
    return "content_filter" in code or "content_policy" in code


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither: ignored, the back-off applies
        return None
    return max(0.0, parsed.timestamp() - time.time())


@dataclass
class LocalVLMBackend:
    """A local vision-language model through transformers (``AutoModelForImageTextToText``,
    e.g. ``Qwen/Qwen2-VL-7B-Instruct``), greedy by default. Requests run one at a time."""

    model_id: str
    cache: ResponseCache | None = None
    max_new_tokens: int = 1024
    max_side: int = 512
    temperature: float = 0.0
    seed: int = 0
    device: str | None = None
    _model: Any = None
    _processor: Any = None
    budget: RequestBudget = field(default_factory=RequestBudget)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return f"local:{self.model_id}"

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from editeval.models import default_device

        self._processor = AutoProcessor.from_pretrained(self.model_id)
        self._model = AutoModelForImageTextToText.from_pretrained(self.model_id).to(
            self.device or default_device()).eval()

    def _images(self, request: JudgeRequest) -> list[Image.Image]:
        images = []
        for path in [request.sample.image_path, *request.images]:
            image = load_image(path)
            image.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
            images.append(image)
        return images

    async def judge(self, request: JudgeRequest, protocol: Protocol) -> JudgeAnswer:
        images = self._images(request)
        text = protocol.prompt(request.sample.task, request.sample.instruction, len(request.images))
        content: list[dict] = [{"type": "text", "text": "SOURCE image:"}, {"type": "image"}]
        for index in range(1, len(request.images) + 1):
            content += [{"type": "text", "text": f"Image {index}:"}, {"type": "image"}]
        content.append({"type": "text", "text": text})
        messages = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
                    {"role": "user", "content": content}]
        key = ResponseCache.key({
            "model": self.model_id, "messages": messages, "repeat": request.repeat,
            "images": [hashlib.sha256(i.tobytes()).hexdigest() for i in images],
            "temperature": self.temperature, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
        })
        cached = self.cache.get(key) if self.cache else None
        if cached is None:
            self.budget.spend()
            answer = await asyncio.to_thread(self._generate, messages, images, request.repeat)
            if self.cache is not None:
                self.cache.put(key, {"model": self.model_id, "messages": messages},
                               {"text": answer})
        else:
            answer = cached["response"]["text"]
        return _answer_from_text(answer, len(request.images), key)

    def _generate(self, messages: list[dict], images: list[Image.Image], repeat: int) -> str:
        with self._lock:  # one model, one request at a time
            return self._generate_locked(messages, images, repeat)

    def _generate_locked(self, messages: list[dict], images: list[Image.Image], repeat: int) -> str:
        import torch

        if self._model is None:
            self._load()
        prompt = self._processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self._processor(text=[prompt], images=images, return_tensors="pt").to(
            self._model.device)
        torch.manual_seed(self.seed + repeat)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 \
            else {"do_sample": False}
        with torch.no_grad():
            output = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self._processor.decode(new_tokens, skip_special_tokens=True)

    async def close(self) -> None:
        return None


@dataclass
class OracleBackend:
    """The toy world's oracle: exact, deterministic scores from ground truth (toy samples only)."""

    budget: RequestBudget = field(default_factory=RequestBudget)

    name = "oracle"

    async def judge(self, request: JudgeRequest, protocol: Protocol) -> JudgeAnswer:
        from editeval.toyworld.dataset import judge_sample

        sample = request.sample
        if "target_scene" not in sample.extra:
            return JudgeAnswer("error", message=f"the oracle judges toy-world samples only; "
                                                f"{sample.id} has no ground-truth scene")
        scores = []
        for path in request.images:
            judged = judge_sample(sample, load_image(path)).score
            scores.append(ImageScores(judged.accuracy, judged.preservation, judged.quality,
                                      judged.realism))
        return JudgeAnswer("ok", scores, raw="oracle")

    async def close(self) -> None:
        return None
