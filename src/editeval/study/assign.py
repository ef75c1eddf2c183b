"""Balanced assignment of a user study's units to raters.

A *unit* is what one rating page shows: in the survey's layout all methods' edits of one source
image (and seed), in the per-edit layout a single edit. :func:`plan` gives every unit to at least
``k`` different raters, never twice to the same rater, and keeps the raters' remaining work within
one unit of each other where the constraint allows it. It is re-run whenever raters are added or
revoked; work already done is never moved, so a rater's progress is kept:

1. a unit counts once for every rater who rated (part of) it, revoked raters included, and once
   for every active rater who holds it; revoked raters' unstarted units are dropped;
2. every unit still under ``k`` goes to the active rater with the least remaining work among those
   who have not seen it (ties rotate with the unit's position, so equal raters share evenly);
3. unstarted units then move from the most to the least loaded raters while their remaining work
   differs by more than one.

A unit that cannot reach ``k`` (fewer than ``k`` active raters can still take it) is reported in
:attr:`Plan.shortfall`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass


@dataclass
class Plan:
    """The outcome of :func:`plan`.

    Attributes:
        assigned: active rater id -> every unit the rater holds, in the order shown to them (units
            held before keep their place; new ones are appended in a per-rater shuffled order).
        shortfall: unit -> how many more raters it would need to reach ``k`` (only units short).
    """

    assigned: dict[int, list[str]]
    shortfall: dict[str, int]

    def load(self, rated: Mapping[int, AbstractSet[str]]) -> dict[int, int]:
        """Remaining units per active rater (held, not yet rated)."""
        return {r: sum(u not in rated.get(r, ()) for u in units)
                for r, units in self.assigned.items()}


def plan(units: Sequence[str], k: int, active: Sequence[int],
         assigned: Mapping[int, Sequence[str]], rated: Mapping[int, AbstractSet[str]],
         seed: int = 0) -> Plan:
    """Assign ``units`` so that each gets at least ``k`` raters (see the module docstring).

    Args:
        units: every unit of the study, in a fixed order.
        k: the number of raters each unit should get, >= 1.
        active: ids of the raters who can take work (not revoked).
        assigned: rater id -> units held so far (any rater; revoked ones included).
        rated: rater id -> units the rater has rated at least one edit of.
        seed: seeds the order in which a rater's new units are shown.

    Raises:
        ValueError: ``k`` < 1.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    active_set = set(active)
    held = {r: list(assigned.get(r, ())) for r in active}
    seen = {r: set(held[r]) | set(rated.get(r, ())) for r in active}
    pending = {r: [u for u in held[r] if u not in rated.get(r, ())] for r in active}
    added: dict[int, list[str]] = {r: [] for r in active}
    coverage = {u: 0 for u in units}
    for rater, done in rated.items():
        if rater not in active_set:
            for unit in done:
                if unit in coverage:
                    coverage[unit] += 1
    for rater in active:
        for unit in seen[rater]:
            if unit in coverage:
                coverage[unit] += 1

    order = {rater: i for i, rater in enumerate(active)}
    shortfall: dict[str, int] = {}
    for index, unit in enumerate(units):
        while coverage[unit] < k:
            free = [r for r in active if unit not in seen[r]]
            if not free:
                shortfall[unit] = k - coverage[unit]
                break
            rater = min(free, key=lambda r: (len(pending[r]),
                                             (order[r] - index) % max(len(active), 1)))
            pending[rater].append(unit)
            added[rater].append(unit)
            seen[rater].add(unit)
            coverage[unit] += 1

    # move unstarted units from the busiest to the idlest rater while loads differ by > 1
    moved = True
    while moved and active:
        moved = False
        for donor in sorted(active, key=lambda r: -len(pending[r])):
            for taker in sorted(active, key=lambda r: len(pending[r])):
                if len(pending[donor]) - len(pending[taker]) <= 1:
                    break
                unit = next((u for u in reversed(pending[donor]) if u not in seen[taker]), None)
                if unit is None:
                    continue
                pending[donor].remove(unit)
                seen[donor].discard(unit)
                if unit in added[donor]:
                    added[donor].remove(unit)
                pending[taker].append(unit)
                added[taker].append(unit)
                seen[taker].add(unit)
                moved = True
                break
            if moved:
                break

    result = {}
    for rater in active:
        keep = [u for u in held[rater] if u in rated.get(rater, ()) or u in pending[rater]]
        new = [u for u in added[rater] if u not in keep]
        random.Random(seed * 1_000_003 + rater).shuffle(new)
        result[rater] = keep + new
    return Plan(result, shortfall)
