"""The ground everything else stands on: value types (requests, results, samples), the method
registry and cards, NFE counting, LMM Score's definition and the build cache. Nothing here imports
from the rest of editeval except the taxonomy (plain data); ``editeval.edit`` is in
:mod:`editeval.editing`."""

from editeval.core.nfe import NFECounter, count_nfe, denoiser
from editeval.core.registry import (
    MethodCard,
    Paper,
    get_method,
    list_methods,
    register_method,
)
from editeval.core.types import EditInputs, EditRequest, EditResult, MethodOutput

__all__ = [
    "EditInputs",
    "EditRequest",
    "EditResult",
    "MethodCard",
    "MethodOutput",
    "NFECounter",
    "Paper",
    "count_nfe",
    "denoiser",
    "get_method",
    "list_methods",
    "register_method",
]
