"""Core API: requests, results, the method registry and cards, NFE counting, ``edit()``."""

from editeval.core.api import EditInputError, edit, model_resolution
from editeval.core.nfe import NFECounter, count_nfe
from editeval.core.registry import (
    EditInputs,
    MethodCard,
    MethodOutput,
    Paper,
    get_method,
    list_methods,
    register_method,
)
from editeval.core.types import EditRequest, EditResult

__all__ = [
    "EditInputError",
    "EditInputs",
    "EditRequest",
    "EditResult",
    "MethodCard",
    "MethodOutput",
    "NFECounter",
    "Paper",
    "count_nfe",
    "edit",
    "get_method",
    "list_methods",
    "model_resolution",
    "register_method",
]
