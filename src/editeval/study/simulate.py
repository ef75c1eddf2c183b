"""Simulated raters on the toy world: the oracle's verdict plus noise, so that the whole study
pipeline (assignment, storage, analysis) can be checked against a known answer.

A simulated rater rates every page assigned to them, through the same checks and writes as the web
app (:meth:`~editeval.study.store.StudyStore.record_unit`). Their rating of factor f of edit e is

    r = clip(round(t + noise * z), 1, 10),   z ~ N(0, 1), independent per rater, edit and factor,

where t is the oracle's score of that factor (the run's ``oracle`` judgement, from
``editeval score RUN --judge oracle``) and ``noise`` the documented option (rating points; 0 gives
the oracle's scores exactly).

The correlation this plants is known in closed form. Given t, r takes value j with probability
Phi((j + 0.5 - t) / noise) - Phi((j - 0.5 - t) / noise) (the ends take the tails), which gives
its mean mu(t) and variance v(t) exactly. An edit rated by n raters has a human mean S_all of
expectation m = sum_f w_f mu(t_f) and variance sum_f w_f^2 v(t_f) / n (w = 0.4, 0.3, 0.2, 0.1).
Over the run's edits, the planted Pearson correlation of LMM Score's S_all = sum_f w_f t_f with
the human mean is cov(S, m) / sqrt(var(S) (var(m) + mean variance)) (moments over edits), and
likewise per factor (t_f against the human mean of factor f). :func:`planted_correlations`
computes it; the analysis must find it inside its confidence interval.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from editeval.core.lmm_score import FACTORS, WEIGHTS
from editeval.run import Run
from editeval.study.analyze import lmm_scores
from editeval.study.store import Rater, StudyError, StudyStore

ORACLE = "oracle"


def rating_moments(truth: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ``clip(round(truth + noise * z), 1, 10)``, z ~ N(0, 1).

    Args:
        truth: oracle scores (any shape, values 1..10).
        noise: standard deviation of the rater's noise in rating points, >= 0.
    Returns:
        ``(mean, variance)``, arrays of ``truth``'s shape.
    """
    truth = np.asarray(truth, dtype=float)
    if noise == 0:
        clipped = np.clip(np.round(truth), 1, 10)
        return clipped, np.zeros_like(clipped)
    values = np.arange(1, 11, dtype=float)
    edges = np.concatenate([[-np.inf], values[:-1] + 0.5, [np.inf]])
    cdf = stats.norm.cdf((edges - truth[..., None]) / noise)
    probability = np.diff(cdf, axis=-1)
    mean = (probability * values).sum(axis=-1)
    variance = (probability * values**2).sum(axis=-1) - mean**2
    return mean, variance


def _population_r(score: np.ndarray, expected: np.ndarray, variance: np.ndarray) -> float:
    """NaN when a side does not vary (a factor the oracle scores alike on every edit)."""
    denominator = np.sqrt(score.var() * (expected.var() + variance.mean()))
    if denominator == 0:
        return float("nan")
    return float(np.mean((score - score.mean()) * (expected - expected.mean())) / denominator)


def planted_correlations(truth: pd.DataFrame, n_ratings: pd.Series, noise: float
                         ) -> dict[str, float]:
    """The Pearson correlations the simulation plants (see the module docstring).

    Args:
        truth: one row per edit, indexed by job id: the oracle's four factors and ``s_all``.
        n_ratings: ratings per edit, indexed by job id (edits without ratings are left out).
        noise: the raters' noise (rating points).
    Returns:
        ``overall`` (LMM S_all against the human mean S_all) and each factor.
    """
    n = n_ratings[n_ratings > 0]
    truth = truth.loc[n.index]
    moments = {f: rating_moments(truth[f].to_numpy(), noise) for f in FACTORS}
    result = {"overall": _population_r(
        truth["s_all"].to_numpy(),
        sum(WEIGHTS[f] / 10 * moments[f][0] for f in FACTORS),
        sum((WEIGHTS[f] / 10) ** 2 * moments[f][1] for f in FACTORS) / n.to_numpy())}
    for f in FACTORS:
        result[f] = _population_r(truth[f].to_numpy(), moments[f][0],
                                  moments[f][1] / n.to_numpy())
    return result


@dataclass
class Simulation:
    """What :func:`simulate_raters` did: the raters it made, the ratings it stored, and the
    correlations it planted (:func:`planted_correlations` over every rated edit)."""

    raters: list[Rater]
    ratings: int
    noise: float
    planted: dict[str, float]


def simulate_raters(run: Run, raters: int, *, noise: float = 1.5, k: int | None = None,
                    layout: str | None = None, seed: int = 0) -> Simulation:
    """Add ``raters`` simulated raters to the run's study and let them rate all their pages.

    Args:
        run: a toy-world run judged by the oracle (``editeval score RUN --judge oracle``).
        raters: how many simulated raters to add.
        noise: their noise, rating points (standard deviation before rounding), >= 0.
        k / layout: the study's settings (:meth:`StudyStore.configure`), kept when None.
        seed: seeds the noise: rater ``i``'s draws for job ``j`` come from
            ``default_rng([seed, i, crc32(j)])``, so a simulation is the same whatever the order.

    Raises:
        ValueError: negative noise, no oracle judgement in the run (the message says how to make
            one), or a study with human raters (simulated ratings would mix with theirs).
    """
    if noise < 0:
        raise ValueError(f"--noise must be at least 0 (rating points), not {noise}")
    try:
        truth, _ = lmm_scores(run, ORACLE)
    except ValueError:
        raise ValueError(f"{run.path} holds no oracle judgement; simulated raters need the toy "
                         f"world's oracle: run `editeval score {run.path} --judge oracle` "
                         "first") from None
    truth = truth.set_index("job_id")
    with StudyStore(run) as store:
        if any(not r.simulated for r in store.raters()):
            raise StudyError("this study has human raters; simulate into a copy of the run, "
                             "so that simulated ratings never mix with theirs")
        store.configure(k, layout)
        unjudged = [e.job_id for e in store.edits() if e.job_id not in truth.index]
        if unjudged:
            raise ValueError(f"{len(unjudged)} edits have no oracle judgement (e.g. "
                             f"{unjudged[0]}); run `editeval score {run.path} --judge oracle`")
        made = store.add_raters(raters, simulated=True, prefix="simulated")
        stored = 0
        for rater in made:
            while (unit := store.progress(rater.rater_id).next_unit) is not None:
                page = {}
                for edit in store.unrated_edits(rater.rater_id, unit):
                    t = truth.loc[edit.job_id, list(FACTORS)].to_numpy(dtype=float)
                    rng = np.random.default_rng([seed, rater.rater_id,
                                                 zlib.crc32(edit.job_id.encode())])
                    drawn = np.clip(np.round(t + noise * rng.standard_normal(len(FACTORS))), 1, 10)
                    page[edit.edit_key] = dict(zip(FACTORS, drawn.astype(int).tolist()))
                stored += store.record_unit(rater.rater_id, page)
        counts = pd.Series([r["job_id"] for r in store.ratings()]).value_counts()
    return Simulation(made, stored, noise, planted_correlations(truth, counts, noise))
