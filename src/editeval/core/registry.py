"""The method registry and method cards.

A method is a function ``fn(pipe, inputs, generator, **params) -> MethodOutput`` registered
with a :class:`MethodCard` that says what it is (paper, the survey's learning strategy and
sub-category), what it needs (inputs, model kind) and how it runs by default (the paper's parameters).
:func:`editeval.core.api.edit` calls it; a method never loads models, counts NFE or resizes images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

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
        nfe_formula: UNet evaluations per edit, as a formula of the parameters.
        deviations: where we depart from the paper, and why.
        note: anything else a user should know.
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


@dataclass(frozen=True)
class EditInputs:
    """A request's inputs as a method sees them: images already at the model's resolution.

    Attributes:
        image: RGB source image, sides multiples of 8 (the model's resolution).
        source_prompt, target_prompt, instruction: as in the request ("" when not given).
        task: EditEval task id or ``None``.
        mask: edit region, mode "L" with values 0/255 (255 = edit), same size as ``image``, or ``None``.
        reference: RGB reference image at the same size, or ``None``.
        inversion_cache: an :class:`~editeval.diffusion.inversion_cache.InversionCache` shared by
            the methods of a run, or ``None`` (inversions are then computed every time).
    """

    image: Image.Image
    source_prompt: str = ""
    target_prompt: str = ""
    instruction: str = ""
    task: str | None = None
    mask: Image.Image | None = None
    reference: Image.Image | None = None
    inversion_cache: Any = None


@dataclass
class MethodOutput:
    """What a method function returns: the edit at the model's resolution, plus intermediates."""

    image: Image.Image
    intermediates: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[..., MethodOutput]


@dataclass(frozen=True)
class RegisteredMethod:
    card: MethodCard
    fn: MethodFn


_REGISTRY: dict[str, RegisteredMethod] = {}


def register_method(card: MethodCard) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register ``fn`` under ``card.name``. A second registration of a name is an error."""

    def decorator(fn: MethodFn) -> MethodFn:
        if card.name in _REGISTRY:
            raise ValueError(f"method {card.name!r} is registered twice")
        _REGISTRY[card.name] = RegisteredMethod(card, fn)
        return fn

    return decorator


def _load_builtin_methods() -> None:
    import editeval.methods  # noqa: F401  (registers the built-in methods)


def get_method(name: str) -> RegisteredMethod:
    """The registered method ``name``; ``KeyError`` with the list of known names otherwise."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_methods() -> list[MethodCard]:
    """Cards of all registered methods, sorted by name."""
    _load_builtin_methods()
    return [_REGISTRY[name].card for name in sorted(_REGISTRY)]
