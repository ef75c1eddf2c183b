"""The survey's user study as a tool: a web app where raters score a run's edits blind to the
method, and the analysis of their ratings against LMM Score and the classic metrics.

Modules: :mod:`~editeval.study.store` (raters, assignments and ratings in the run's
``results.sqlite``), :mod:`~editeval.study.assign` (balanced assignment),
:mod:`~editeval.study.app` (the FastAPI app), :mod:`~editeval.study.analyze` (agreement,
correlations, figures, CSV), :mod:`~editeval.study.simulate` (simulated raters on the toy world),
:mod:`~editeval.study.load` (a bounded load client). ``editeval study ...`` drives them.
"""

from editeval.study.analyze import analyze, human_mean_ratings, ratings_table
from editeval.study.store import LAYOUTS, RatingRefused, StudyError, StudyStore

__all__ = ["LAYOUTS", "RatingRefused", "StudyError", "StudyStore", "analyze", "human_mean_ratings",
           "ratings_table"]
