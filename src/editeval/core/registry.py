"""The method registry and method cards.

A method is a function ``fn(pipe, inputs, generator, *, param, ...) -> MethodOutput`` registered
with a :class:`MethodCard` that says what it is (paper, the survey's learning strategy and
sub-category), what it needs (inputs, model kind) and how it runs by default (the paper's parameters).
:func:`editeval.editing.edit` calls it; a method never loads models, counts NFE or resizes images.

Parameters are declared once: their default values on the card (``defaults``), their names again in
the function's keyword-only signature, without defaults; :func:`register_method` refuses a function
whose keyword-only parameters differ from the card's (a ``**params`` catch-all passes the rest on).

Methods come from the entry point group ``editeval.methods``: editeval registers its built-in methods
(:mod:`editeval.methods`) through it, and any installed package can add its own the same way
(``docs/writing-a-method.md``), without editing editeval. The group is loaded on the first lookup.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from editeval.core.types import MethodOutput
from editeval.taxonomy import STRATEGIES, SUBCATEGORIES

INPUTS = ("source_prompt", "target_prompt", "instruction", "mask", "reference")


@dataclass(frozen=True)
class Paper:
    """A paper reference: title, venue, year and arXiv id."""

    title: str
    venue: str
    year: int
    arxiv_id: str

    def __str__(self) -> str:
        return f"{self.title} ({self.venue} {self.year}, arXiv:{self.arxiv_id})"


@dataclass(frozen=True)
class MethodCard:
    """What a method is, needs and does by default.

    Attributes:
        name: registry name (``sdedit``), used on the command line.
        title: human name (``SDEdit``).
        paper: the method's paper.
        strategy: the survey's learning strategy (an id of :data:`editeval.taxonomy.STRATEGIES`).
        subcategory: the survey's sub-category (an id of :data:`editeval.taxonomy.SUBCATEGORIES`),
            or ``None`` when the survey's paper list does not hold the paper (``note`` says so).
        inputs: request fields the method needs, from :data:`INPUTS`.
        optional_inputs: request fields the method uses when given (a mask that switches on a
            mask-guided variant, ...), from :data:`INPUTS`; never required.
        model_kind: the kind of checkpoint it runs on (``text-to-image``, ``instruction``, ...).
        tasks: EditEval tasks it is meant for.
        defaults: parameter defaults, from the paper.
        nfe_formula: denoiser evaluations per edit, as a formula of the parameters.
        backward_formula: backward passes through the denoiser per edit (gradient steps), as a
            formula of the parameters; ``"0"`` for a method that takes no gradient.
        deviations: where we depart from the paper, and why.
        note: anything else a user should know.
        soft_mask: the method reads the mask's grey levels as per-pixel edit strengths (0 = keep,
            255 = full edit; Differential Diffusion); every other method gets its mask binarised
            (grey >= 128 is edit).
    """

    name: str
    title: str
    paper: Paper
    strategy: str
    subcategory: str | None
    inputs: tuple[str, ...]
    model_kind: str
    tasks: tuple[str, ...]
    defaults: Mapping[str, Any]
    nfe_formula: str
    deviations: str = ""
    note: str = ""
    optional_inputs: tuple[str, ...] = ()
    backward_formula: str = "0"
    soft_mask: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"{self.name}: strategy {self.strategy!r} not in {list(STRATEGIES)}")
        if self.subcategory is not None and SUBCATEGORIES[self.subcategory].strategy != self.strategy:
            raise ValueError(f"{self.name}: sub-category {self.subcategory!r} is not under "
                             f"{self.strategy!r}")
        unknown = (set(self.inputs) | set(self.optional_inputs)) - set(INPUTS)
        if unknown:
            raise ValueError(f"{self.name}: unknown inputs {sorted(unknown)}; expected {INPUTS}")
        both = set(self.inputs) & set(self.optional_inputs)
        if both:
            raise ValueError(f"{self.name}: inputs {sorted(both)} are both required and optional")
        if self.soft_mask and "mask" not in set(self.inputs) | set(self.optional_inputs):
            raise ValueError(f"{self.name}: soft_mask is set but the method takes no mask")

    def resolve_params(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The card's defaults updated by ``overrides``, each cast to its default's type.

        Raises:
            ValueError: an unknown parameter name (the message lists the valid ones) or a value that
                cannot be cast.
        """
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter {', '.join(sorted(unknown))}; its "
                f"parameters are: {', '.join(f'{k}={v!r}' for k, v in self.defaults.items())}"
            )
        params = dict(self.defaults)
        for key, value in overrides.items():
            kind = type(self.defaults[key])
            try:
                if kind is bool and isinstance(value, str):
                    params[key] = _parse_bool(value)
                else:
                    params[key] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"method {self.name!r}: parameter {key}={value!r} is not a {kind.__name__}"
                ) from None
        return params


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(text)
    return lowered in ("1", "true", "yes", "on")


MethodFn = Callable[..., MethodOutput]


@dataclass(frozen=True)
class RegisteredMethod:
    """A method's card, its function and its parameter check (``check(**params)`` raises
    ``ValueError`` for a value out of range; ``None`` when every value of the right type works).

    ``canvas``, for a method that extends the image (outpainting): ``canvas(size, **params)``
    gives the pixels ``(left, top, right, bottom)`` added around a source of ``size`` (width,
    height), at the source's size; :func:`editeval.editing.edit` pads the source, gives the
    method the new area as its mask and pastes the source back into the result. ``None`` for a
    method whose edit has the source's size."""

    card: MethodCard
    fn: MethodFn
    check: Callable[..., None] | None = None
    canvas: Callable[..., tuple[int, int, int, int]] | None = None

    def resolve_params(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`MethodCard.resolve_params`, then the method's range check: every parameter is
        known, typed and in range before a model loads.

        Raises:
            ValueError: an unknown name, a value that cannot be cast, or one out of range (the
                message names the method, the parameter and its range).
        """
        params = self.card.resolve_params(overrides)
        if self.check is not None:
            self.check(**params)
        return params


_REGISTRY: dict[str, RegisteredMethod] = {}


ENTRY_POINT_GROUP = "editeval.methods"
"""Entry point group whose modules register methods when imported."""


def register_method(card: MethodCard, check: Callable[..., None] | None = None,
                    canvas: Callable[..., tuple[int, int, int, int]] | None = None,
                    ) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` under ``card.name``, with ``check(**params)``, the parameter
    range check that :meth:`RegisteredMethod.resolve_params` runs before any model loads (so a
    method's body need not check what does not depend on the model), and for a method that
    extends the image its ``canvas`` (see :class:`RegisteredMethod`).

    Raises:
        ValueError: the name is registered already, or ``fn``'s keyword-only parameters are not the
            card's parameters (each named once, none with a default of its own: the defaults are
            the card's).
    """

    def decorator(fn: MethodFn) -> MethodFn:
        if card.name in _REGISTRY:
            raise ValueError(f"method {card.name!r} is registered twice")
        check_signature(card, fn)
        _REGISTRY[card.name] = RegisteredMethod(card, fn, check, canvas)
        return fn

    return decorator


def check_signature(card: MethodCard, fn: MethodFn) -> None:
    """Refuse a method function whose keyword-only parameters disagree with ``card.defaults``.

    Every keyword-only parameter must be one of the card's, without a default of its own; every
    parameter of the card must be named, unless ``fn`` takes ``**params`` (which passes them on).

    Raises:
        ValueError: naming the parameters that differ.
    """
    parameters = inspect.signature(fn).parameters.values()
    named = {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    problems = []
    if set(named) - set(card.defaults):
        problems.append(f"takes {', '.join(sorted(set(named) - set(card.defaults)))}, which the "
                        "card's defaults lack")
    if not catch_all and set(card.defaults) - set(named):
        problems.append(f"does not take {', '.join(sorted(set(card.defaults) - set(named)))}")
    own = sorted(n for n, p in named.items() if p.default is not inspect.Parameter.empty)
    if own:
        problems.append(f"gives {', '.join(own)} a default of its own (defaults belong on the card)")
    if problems:
        raise ValueError(f"method {card.name!r}: its function {fn.__name__} " + "; ".join(problems))


def load_plugins() -> None:
    """Import every module of the :data:`ENTRY_POINT_GROUP` entry points (once; importing registers).

    A third-party plugin that fails to import is skipped with a warning naming it; editeval's own
    built-in methods failing to import is an error.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.value.split(".")[0] == "editeval":
            point.load()
            continue
        try:
            point.load()
        except Exception as err:  # a broken plugin must not take the built-in methods down
            warnings.warn(f"editeval method plugin {point.name!r} ({point.value}) failed to "
                          f"import and is skipped: {type(err).__name__}: {err}", stacklevel=2)


_PLUGINS_LOADED = False


def get_method(name: str) -> RegisteredMethod:
    """The registered method ``name``; ``KeyError`` with the list of known names otherwise."""
    load_plugins()
    if name not in _REGISTRY:
        if not _REGISTRY:
            raise KeyError(f"unknown method {name!r}: no method is registered (is editeval "
                           "installed? `pip install -e .` registers the built-in methods)")
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_methods() -> list[MethodCard]:
    """Cards of all registered methods, sorted by name."""
    load_plugins()
    return [_REGISTRY[name].card for name in sorted(_REGISTRY)]
