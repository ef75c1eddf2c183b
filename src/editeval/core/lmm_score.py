"""LMM Score's four factors and how they combine (the survey's section 8).

A large multimodal model (or, on the toy world, the oracle) scores an edit on editing accuracy,
contextual preservation, visual quality and logical realism, integers 1-10; the overall score is
S_all = 0.4 S_acc + 0.3 S_pre + 0.2 S_qua + 0.1 S_real. How the judge is asked is
:mod:`editeval.judge.protocol`; this module is only the definition, shared by every judge.
"""

from __future__ import annotations

from collections.abc import Mapping

FACTORS = ("accuracy", "preservation", "quality", "realism")
WEIGHTS = {"accuracy": 4, "preservation": 3, "quality": 2, "realism": 1}  # tenths


def overall(scores: Mapping[str, int]) -> float:
    """S_all = 0.4 acc + 0.3 pre + 0.2 qua + 0.1 real, exact to one decimal (computed in tenths).

    Args:
        scores: an integer 1-10 for each of :data:`FACTORS`.
    """
    return sum(WEIGHTS[f] * scores[f] for f in FACTORS) / 10
