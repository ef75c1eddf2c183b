"""LMM Score: the survey's four-factor judge protocol, its backends, parsing and leaderboard."""

from __future__ import annotations

import os

from editeval.core.lmm_score import overall
from editeval.judge.backends import (
    FAILURE_KINDS,
    JudgeUnreachable,
    LocalVLMBackend,
    OpenAICompatibleBackend,
    OracleBackend,
    RequestBudget,
    ResponseCache,
    public_judge_name,
    redact_url,
)
from editeval.judge.leaderboard import leaderboard, to_markdown
from editeval.judge.parsing import ImageScores, ParseFailure, parse_scores
from editeval.judge.protocol import PROTOCOL_VERSION, Protocol
from editeval.judge.runner import ScoreSummary, score_run
from editeval.run import Run

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def make_backend(spec: str, run: Run, *, base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", budget: int | None = None,
                 temperature: float = 0.0, seed: int = 0, max_side: int = 512,
                 timeout: float = 120.0, retry_total: float = 300.0, structured: bool = False):
    """A backend from ``oracle``, ``openai:MODEL`` or ``local:MODEL_ID_OR_PATH``.

    OpenAI-compatible servers: ``base_url`` (else ``$OPENAI_BASE_URL``, else OpenAI's; user info
    and query parameters are sent but never stored), key from the environment variable
    ``api_key_env``; ``timeout`` seconds per request, retried for up to ``retry_total`` seconds.
    Answers are cached in the run's judge cache (``RUN_DIR/judge_cache``).

    Raises:
        ValueError: an unknown judge spec, or a base URL that is not http(s).
    """
    cache = ResponseCache(run.judge_cache_dir)
    limit = RequestBudget(budget)
    if spec == "oracle":
        return OracleBackend(budget=limit)
    kind, _, model = spec.partition(":")
    if kind == "openai" and model:
        return OpenAICompatibleBackend(
            model=model, base_url=base_url or os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
            api_key_env=api_key_env, cache=cache, budget=limit, temperature=temperature,
            seed=seed, max_side=max_side, timeout=timeout, retry_total=retry_total,
            structured=structured)
    if kind == "local" and model:
        return LocalVLMBackend(model_id=model, cache=cache, budget=limit,
                               temperature=temperature, seed=seed, max_side=max_side)
    raise ValueError(f"unknown judge {spec!r}; use oracle, openai:MODEL (e.g. openai:gpt-4o) or "
                     "local:MODEL (e.g. local:Qwen/Qwen2-VL-7B-Instruct)")


__all__ = [
    "FAILURE_KINDS",
    "PROTOCOL_VERSION",
    "ImageScores",
    "JudgeUnreachable",
    "LocalVLMBackend",
    "OpenAICompatibleBackend",
    "OracleBackend",
    "ParseFailure",
    "Protocol",
    "ScoreSummary",
    "leaderboard",
    "make_backend",
    "overall",
    "parse_scores",
    "public_judge_name",
    "redact_url",
    "score_run",
    "to_markdown",
]
