"""Test-only editing methods that kill the worker process running them, for tests/test_ray.py.

The module is a method plugin as a user's package would be: ``test_ray`` gives Ray's workers a
folder on their ``PYTHONPATH`` that holds this module and a ``*.dist-info`` declaring it in the
``editeval.methods`` entry point group, so the workers' registry imports it like any plugin.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch

from editeval.core import EditInputs, MethodCard, MethodOutput, Paper, register_method
from editeval.core.registry import get_method
from editeval.core.samples import TASKS

_TEST_PAPER = Paper("(a test method, no paper)", "-", 2026, "-")


def _card(name: str, defaults: dict[str, Any], what: str) -> MethodCard:
    return MethodCard(name=name, title=name, paper=_TEST_PAPER, strategy="training-free",
                      subcategory=None, inputs=("target_prompt",), model_kind="text-to-image",
                      tasks=TASKS, defaults=defaults, nfe_formula="as sdedit", note=what)


SDEDIT_DEFAULTS = {"strength": 0.5, "num_inference_steps": 50, "guidance_scale": 7.5, "eta": 0.0}

KILL_ONCE = _card("sigkill-once", {**SDEDIT_DEFAULTS, "marker": ""},
                  "Not in the survey's paper list: SDEdit, but the first call (no file at "
                  "`marker` yet) creates the file and SIGKILLs its own process.")
KILL_ALWAYS = _card("sigkill-always", {}, "Not in the survey's paper list: SIGKILLs its own "
                                          "process on every call.")


@register_method(KILL_ONCE)
def sigkill_once(pipe: Any, inputs: EditInputs, generator: torch.Generator, *, marker: str,
                 **sdedit: Any) -> MethodOutput:
    """SDEdit's edit, unless no file is at ``marker``: then create it and die by SIGKILL."""
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return get_method("sdedit").fn(pipe, inputs, generator, **sdedit)
    os.kill(os.getpid(), signal.SIGKILL)


@register_method(KILL_ALWAYS)
def sigkill_always(pipe: Any, inputs: EditInputs, generator: torch.Generator) -> MethodOutput:
    """Die by SIGKILL."""
    os.kill(os.getpid(), signal.SIGKILL)
