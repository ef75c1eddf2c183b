"""Planning a run: its jobs, which are finished already, and whether every method can run on the
dataset at all, all decided before any model loads or anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from editeval.core.registry import MethodCard, get_method
from editeval.core.samples import Sample
from editeval.run import Run, RunConfig

# the sample field that gives each input a card can require, and what to tell the user
_SAMPLE_FIELDS = {
    "source_prompt": "source_prompt",
    "target_prompt": "target_prompt",
    "instruction": "instruction",
    "mask": "mask_path",
}


class PlanError(ValueError):
    """A run cannot start: a method needs an input the dataset's samples do not have, or there
    is no job at all."""


@dataclass(frozen=True)
class Job:
    """One edit of a run: a method on a sample with a seed."""

    method: str
    sample: Sample
    seed: int

    @property
    def job_id(self) -> str:
        return f"{self.method}/{self.sample.id}/seed{self.seed}"


@dataclass
class Plan:
    """A run's jobs (method-major, so each model stays loaded), the ones still to run, the
    methods' cards and the dataset's absent images."""

    jobs: list[Job]
    pending: list[Job]
    cards: dict[str, MethodCard]
    missing_images: list[str]

    @property
    def skipped(self) -> int:
        """Jobs finished before (or failed before, with ``--skip-failed``)."""
        return len(self.jobs) - len(self.pending)


def plan_jobs(samples: Sequence[Sample], methods: Sequence[str], seeds: Sequence[int]) -> list[Job]:
    """All (method, sample, seed) jobs, method-major so each model stays hot."""
    return [Job(m, s, seed) for m in methods for s in samples for seed in seeds]


def check_inputs(cards: dict[str, MethodCard], samples: Sequence[Sample], dataset: str) -> None:
    """Refuse a method that needs an input (a mask, a reference image, a prompt) that some of the
    selected samples lack.

    Raises:
        PlanError: naming the method, the input, how many samples lack it and one of them.
    """
    for card in cards.values():
        for needed in card.inputs:
            field = _SAMPLE_FIELDS.get(needed)
            lacking = [s.id for s in samples if field is None or not getattr(s, field)]
            if lacking:
                raise PlanError(
                    f"method {card.name!r} needs {needed.replace('_', ' ')}, which "
                    f"{len(lacking)} of the {len(samples)} selected samples of {dataset!r} lack "
                    f"(e.g. {lacking[0]}): leave the method out or use a dataset that has it")


def plan_run(config: RunConfig, run: Run) -> Plan:
    """The plan of ``config`` in ``run``: methods and parameters checked, the dataset loaded and
    filtered, every method's required inputs checked against it, finished jobs left out.

    Raises:
        KeyError: an unknown method. ValueError: a bad parameter, or parameters for a method not
            among ``config.methods``. DatasetError: the dataset cannot be loaded or filtered.
        PlanError: a method needs an input the samples lack or extends the image (outpainting),
            or the selection leaves no job.
    """
    cards = {name: get_method(name).card for name in config.methods}
    for name in config.params:
        if name not in cards:
            raise ValueError(f"parameters given for {name!r}, which is not among --methods")
    for name in cards:  # unknown names and values out of range fail before the run
        get_method(name).resolve_params(config.params.get(name, {}))
        if get_method(name).canvas is not None:
            raise PlanError(f"method {name!r} extends the image: its edits are larger than their "
                            "sources, which a benchmark compares pixel by pixel; run it with "
                            "`editeval edit`")
    samples = run.dataset.select(config.tasks or None, config.limit, config.per_task)
    check_inputs(cards, samples, config.dataset)
    jobs = plan_jobs(samples, config.methods, config.seeds)
    if not jobs:
        raise PlanError(f"nothing to run: the selection of {config.dataset!r} (tasks, limit, "
                        "per-task), methods and seeds leaves no job")
    finished = run.finished(config.retry_failed)
    pending = [job for job in jobs if job.job_id not in finished]
    return Plan(jobs, pending, cards, run.dataset.missing)
