"""Dataset-independent containers for image-editing benchmark samples.

A :class:`Sample` is one editing case (an input image plus the prompts that
describe the edit); a :class:`Dataset` is an ordered collection of samples
together with the ids of cases whose image file could not be found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TASKS: tuple[str, ...] = (
    "object_addition",
    "object_replacement",
    "object_removal",
    "background_change",
    "style_change",
    "texture_change",
    "action_change",
)
"""Canonical editing-task ids, in the order used by EditEval v1."""


class DatasetError(ValueError):
    """A dataset is missing, malformed or queried with invalid arguments."""


@dataclass(frozen=True)
class Sample:
    """One image-editing case.

    Attributes:
        id: Stable identifier ``"<task>/<number>"``, e.g. ``"object_addition/1"``.
        task: Canonical task id, one of :data:`TASKS`.
        image_path: The source image to be edited.
        source_prompt: Caption describing the source image (used by
            inversion-based, description-driven methods).
        target_prompt: Caption describing the desired edited image.
        instruction: Imperative edit instruction (used by instruction-driven
            methods such as InstructPix2Pix).
        mask_path: Optional binary mask of the region to edit, if the dataset
            provides one.
        target_image_path: Optional ground-truth edited image, where a dataset
            has one.
        extra: Further dataset-specific string metadata.
    """

    id: str
    task: str
    image_path: Path
    source_prompt: str
    target_prompt: str
    instruction: str
    mask_path: Path | None = None
    target_image_path: Path | None = None
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Dataset:
    """An ordered collection of samples.

    Attributes:
        name: Dataset name, e.g. ``"editeval_v1"``.
        root: Folder the dataset was loaded from.
        samples: Samples whose image exists, in dataset order.
        missing: Ids of cases whose prompts exist but whose image file is absent.
    """

    name: str
    root: Path
    samples: list[Sample]
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Return the number of available samples."""
        return len(self.samples)

    def tasks(self) -> list[str]:
        """Return the tasks that have at least one sample, in canonical order."""
        present = {s.task for s in self.samples}
        return [t for t in TASKS if t in present]

    def select(
        self, tasks: Iterable[str] | None = None, limit: int | None = None,
        per_task: int | None = None,
    ) -> list[Sample]:
        """Return samples filtered by task and truncated.

        Args:
            tasks: Canonical task ids to keep; ``None`` keeps every task.
            limit: Maximum number of samples to return for the whole selection
                (not per task), taken in dataset order after task filtering;
                ``None`` returns all of them.
            per_task: Keep at most this many samples of each task (the first
                ones in dataset order), applied before ``limit``.

        Raises:
            DatasetError: If a task name is not one of :data:`TASKS`, or
                ``limit`` or ``per_task`` is negative.
        """
        chosen = self.samples
        if tasks is not None:
            wanted = set(tasks)
            unknown = sorted(wanted.difference(TASKS))
            if unknown:
                raise DatasetError(
                    f"unknown task(s) {', '.join(unknown)}; valid tasks are: {', '.join(TASKS)}"
                )
            chosen = [s for s in chosen if s.task in wanted]
        if per_task is not None:
            if per_task < 0:
                raise DatasetError(f"per_task must be >= 0, got {per_task}")
            taken: dict[str, int] = {}
            kept = []
            for sample in chosen:
                taken[sample.task] = taken.get(sample.task, 0) + 1
                if taken[sample.task] <= per_task:
                    kept.append(sample)
            chosen = kept
        if limit is not None:
            if limit < 0:
                raise DatasetError(f"limit must be >= 0, got {limit}")
            chosen = chosen[:limit]
        return list(chosen)
