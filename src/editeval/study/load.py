"""A bounded load client for the study app: many raters at once, each rating a fixed number of
pages as a browser would (GET the page, POST its form with the page's Origin), then submitting
their last page once more (a double submit, which must be refused). It stops by itself: every
rater makes at most ``pages`` round trips, and the whole run is cut at ``timeout`` seconds.

Used by ``benchmarks/study_load.py`` (prints response times) and the load test (checks that every
acknowledged rating is stored once and as sent).
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import numpy as np

from editeval.core.lmm_score import FACTORS

_CSRF = re.compile(r"name='csrf' value='([^']+)'")
_EDIT = re.compile(r"name='([\w-]+)\.accuracy'")


@dataclass
class LoadResult:
    """What the load client saw.

    Attributes:
        acknowledged: (rater token, edit key) -> the factors sent, for every rating the server
            acknowledged (303 redirect).
        latencies: request kind (``GET page``, ``POST rating``, ``POST duplicate``) -> seconds.
        duplicates_refused: double submits the server refused with 409.
        errors: unexpected answers (status and the start of the body).
        seconds: wall time of the whole run.
    """

    acknowledged: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    duplicates_refused: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float, kind: str | None = None) -> float:
        """The ``q``-th percentile (0-100) of the response times in milliseconds, of one request
        kind or of all requests."""
        values = self.latencies[kind] if kind else [v for vs in self.latencies.values() for v in vs]
        return float(np.percentile(values, q) * 1000) if values else float("nan")


async def _rater(client: httpx.AsyncClient, origin: str, token: str, pages: int,
                 rng: random.Random, result: LoadResult) -> None:
    last_form = None
    for _ in range(pages):
        start = time.perf_counter()
        page = await client.get(f"/r/{token}")
        result.latencies["GET page"].append(time.perf_counter() - start)
        if page.status_code != 200 or "id='done'" in page.text:
            result.errors.append(f"GET {page.status_code}: {page.text[:80]}")
            return
        csrf = _CSRF.search(page.text)
        keys = _EDIT.findall(page.text)
        if csrf is None or not keys:
            result.errors.append(f"GET 200 without a form: {page.text[:80]}")
            return
        sent = {key: {f: rng.randint(1, 10) for f in FACTORS} for key in keys}
        form = {"csrf": csrf[1]} | {f"{key}.{f}": str(v) for key, scores in sent.items()
                                    for f, v in scores.items()}
        start = time.perf_counter()
        answer = await client.post(f"/r/{token}/rate", data=form,
                                   headers={"Origin": origin, "Referer": f"{origin}/r/{token}"})
        result.latencies["POST rating"].append(time.perf_counter() - start)
        if answer.status_code != 303:
            result.errors.append(f"POST {answer.status_code}: {answer.text[:80]}")
            return
        for key, scores in sent.items():
            result.acknowledged[(token, key)] = scores
        last_form = form
    if last_form is not None:
        start = time.perf_counter()
        again = await client.post(f"/r/{token}/rate", data=last_form, headers={"Origin": origin})
        result.latencies["POST duplicate"].append(time.perf_counter() - start)
        if again.status_code == 409:
            result.duplicates_refused += 1
        else:
            result.errors.append(f"double submit answered {again.status_code}")


async def _run(base_url: str, tokens: list[str], pages: int, seed: int, timeout: float
               ) -> LoadResult:
    result = LoadResult()
    tls = ssl.create_default_context()  # built once: 30 ms each (plain HTTP never uses it)

    async def one(index: int, token: str) -> None:  # a client (one connection) per rater
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout, verify=tls,
                                     trust_env=False) as client:  # no proxy for loopback
            await _rater(client, base_url, token, pages, random.Random(f"{seed}/{index}"), result)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one(i, t) for i, t in enumerate(tokens))), timeout)
    result.seconds = time.perf_counter() - start
    return result


def run_load(base_url: str, tokens: list[str], pages: int, *, seed: int = 0,
             timeout: float = 120.0) -> LoadResult:
    """Let one concurrent client per token rate ``pages`` pages on the study at ``base_url``.

    Raises:
        TimeoutError: the run took longer than ``timeout`` seconds.
    """
    return asyncio.run(_run(base_url.rstrip("/"), tokens, pages, seed, timeout))
