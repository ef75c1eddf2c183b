"""Judge backends: an OpenAI-compatible Chat Completions client, a local transformers
vision-language model, and the toy world's oracle.

Every chat request is cached on disk under the sha256 of its payload (model, messages with the
images, temperature, seed, repeat), request and response together, with no secret in either (the
API key only ever travels in a header), so rescoring costs nothing and a crash loses nothing.
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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from editeval.data.images import load_image
from editeval.core.samples import Sample
from editeval.judge.parsing import ImageScores, ParseFailure, parse_scores
from editeval.judge.protocol import SYSTEM_PROMPT, Protocol

RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class BudgetExhausted(RuntimeError):
    """The run's request budget is spent; unscored items stay unscored (not failures)."""


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

    status: str
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
        path = self._path(key)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, request: dict, response: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"request": request, "response": response}))
        os.replace(tmp, path)


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
        timeout: seconds per HTTP request. max_retries: retries on timeouts, 408/409/429/5xx.
        backoff: first retry delay in seconds (doubling, with jitter), unless Retry-After says.
        structured: also send ``response_format`` with the JSON schema (servers that support it).
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
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    structured: bool = False
    _client: Any = None

    @property
    def name(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

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
        body = await asyncio.to_thread(self.payload, request, protocol)  # image encoding
        key = ResponseCache.key({**body, "repeat": request.repeat})
        cached = self.cache.get(key) if self.cache else None
        if cached is not None:
            return self._interpret(cached["response"], len(request.images), key)
        response = await self._post(body)
        if self.cache is not None and response.get("kind") != "error":
            self.cache.put(key, _without_images(body), response)
        return self._interpret(response, len(request.images), key)

    def _interpret(self, response: dict, n_images: int, key: str) -> JudgeAnswer:
        if response["kind"] == "refused":
            return JudgeAnswer("refused", raw=json.dumps(response["body"]),
                               message=response["message"], cache_key=key)
        if response["kind"] == "error":
            return JudgeAnswer("error", raw=json.dumps(response.get("body")),
                               message=response["message"], cache_key=key)
        choice = response["body"]["choices"][0]
        message = choice.get("message") or {}
        if message.get("refusal") or choice.get("finish_reason") == "content_filter":
            return JudgeAnswer("refused", raw=json.dumps(response["body"]),
                               message=message.get("refusal") or "finish_reason=content_filter",
                               cache_key=key)
        return _answer_from_text(message.get("content") or "", n_images, key)

    async def _post(self, body: dict) -> dict:
        """POST with retries; returns {"kind": "ok"|"refused"|"error", "body", "message"}."""
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        url = self.base_url.rstrip("/") + "/chat/completions"
        last = ""
        for attempt in range(self.max_retries + 1):
            self.budget.spend()
            retry_after = None
            try:
                reply = await self._client.post(url, json=body, headers=self._headers())
            except (httpx.TimeoutException, httpx.TransportError) as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if reply.status_code == 200:
                    return {"kind": "ok", "body": reply.json(), "message": ""}
                detail = _error_detail(reply)
                if reply.status_code == 400 and _is_content_filter(detail):
                    return {"kind": "refused", "body": detail,
                            "message": str(detail.get("error", {}).get("message", detail))}
                last = f"HTTP {reply.status_code}: {detail}"
                if reply.status_code not in RETRY_STATUSES:
                    return {"kind": "error", "body": detail, "message": last}
                retry_after = _retry_after(reply.headers.get("retry-after"))
            if attempt < self.max_retries:
                delay = retry_after if retry_after is not None else min(
                    self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random())
                await asyncio.sleep(delay)
        return {"kind": "error", "body": None,
                "message": f"gave up after {self.max_retries + 1} attempts; last: {last}"}

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
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


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
