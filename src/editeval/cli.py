"""The ``editeval`` command line: a thin layer over the library.

    editeval edit photo.jpg --method sdedit --target-prompt "a dog on a sofa" -o out.png
    editeval bench --dataset editeval-v1 --data-dir DIR --methods sdedit,instructpix2pix --model sd15
    editeval methods
    editeval models
    editeval catalog --subcategory instructional-editing
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Diffusion-model-based image editing: methods, the EditEval benchmark, the survey's taxonomy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# soft_wrap: printed lines stay whole whatever the width (a CSV or Markdown piped into a file, an
# error line in a log); tables still fit the terminal
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


@app.callback()
def _options(
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch (default: OMP_NUM_THREADS, else half the cores, so that "
                    "one other busy process does not slow editeval down; docs in editeval.core.threads).")] = None,
) -> None:
    """Diffusion-model-based image editing: methods, the EditEval benchmark, the survey's taxonomy."""
    from editeval.core.threads import configure_threads

    try:
        configure_threads(threads)
    except ValueError as err:
        errors.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn the library's input and configuration errors into one red line and exit code 2."""
    from editeval.bench import PlanError
    from editeval.run import NotARunError, RunConfigError
    from editeval.editing import EditInputError
    from editeval.core.samples import DatasetError
    from editeval.data import ImageLoadError, MaskError
    from editeval.models import ModelNotAvailableError

    try:
        yield
    except (DatasetError, EditInputError, ImageLoadError, MaskError, ModelNotAvailableError,
            NotARunError, PlanError, RunConfigError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        errors.print(f"[red]error:[/red] {message}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as err:  # a full or read-only disk, a folder without permission: not a usage error
        errors.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(1) from None


def _parse_params(items: list[str], qualified: bool) -> dict[str, Any]:
    """``name=value`` (or ``method.name=value`` when ``qualified``) into a (nested) dict."""
    params: dict[str, Any] = {}
    pattern = r"([\w-]+)\.(\w+)=(.*)" if qualified else r"(\w+)=(.*)"
    for item in items:
        match = re.fullmatch(pattern, item)
        if not match:
            form = "METHOD.NAME=VALUE" if qualified else "NAME=VALUE"
            raise typer.BadParameter(f"{item!r} is not of the form {form}")
        if qualified:
            params.setdefault(match[1], {})[match[2]] = match[3]
        else:
            params[match[1]] = match[2]
    return params


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@contextmanager
def _input_warnings_as_lines() -> Iterator[None]:
    """Print each :class:`~editeval.editing.EditInputWarning` as one yellow line when issued
    (every one, not once per place); other warnings as Python shows them."""
    import warnings

    from editeval.editing import EditInputWarning

    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, EditInputWarning):
                errors.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        warnings.simplefilter("always", EditInputWarning)
        yield


@contextmanager
def _step_display(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A rich bar for one :func:`editeval.core.progress.step_progress` task of an edit (on
    standard error): the task, its steps and the latest values (an optimisation's loss)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[values]}"), TimeElapsedColumn(), console=errors,
                  transient=True) as progress:
        task = progress.add_task(description, total=total, values="")

        def update(**values: float) -> None:
            shown = "  ".join(f"{name} {value:.4g}" for name, value in values.items())
            progress.update(task, advance=1, values=shown)

        yield update


@app.command()
def edit(
    image: Annotated[Path, typer.Argument(help="Source image (any format Pillow reads).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method name (see `editeval methods`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the edit (PNG, JPEG, ...).")] = Path("edited.png"),
    source_prompt: Annotated[str, typer.Option(help="Caption of the source image.")] = "",
    target_prompt: Annotated[str, typer.Option(help="Caption of the wanted result.")] = "",
    instruction: Annotated[str, typer.Option(help="Edit instruction (instruction-based methods).")] = "",
    mask: Annotated[Path | None, typer.Option(help="Edit-region mask, white = edit.")] = None,
    model: Annotated[str, typer.Option(help="Suite (sd15, sd21, sdxl, toy, tiny), short name, local path or hub id; toy is shipped and runs offline.")] = "sd15",
    seed: Annotated[int, typer.Option(help="Random seed; equal seeds give equal edits on the CPU.")] = 0,
    param: Annotated[list[str], typer.Option("--param", "-p", help="Method parameter NAME=VALUE, repeatable (e.g. -p strength=0.6).")] = [],
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ...; default cuda when available.")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32; default fp16 on CUDA, fp32 on CPU.")] = None,
    resize_mask: Annotated[bool, typer.Option("--resize-mask", help="Stretch a mask of another aspect ratio to the image (refused otherwise).")] = False,
    truncate_prompts: Annotated[bool, typer.Option("--truncate-prompts", help="Cut a prompt longer than the text encoder takes (77 CLIP tokens) at the last whole word that fits (refused otherwise).")] = False,
) -> None:
    """Edit one image with one method and write the result at the source's size.

    Every input is checked before the model loads. An input the method does not use, a truncated
    prompt or identical source and target prompts give a one-line warning.
    """
    from PIL import Image

    from editeval.core import EditRequest
    from editeval.core.progress import showing_progress
    from editeval.editing import edit as run_edit

    with _clean_errors(), _input_warnings_as_lines():
        if output.suffix.lower() not in Image.registered_extensions():
            raise ValueError(f"cannot write {output}: unknown image extension "
                             f"{output.suffix or '(none)'}; use .png, .jpg, .webp, ...")
        request = EditRequest(image, source_prompt=source_prompt, target_prompt=target_prompt,
                              instruction=instruction, mask=mask, seed=seed,
                              params=_parse_params(param, qualified=False),
                              resize_mask=resize_mask, truncate_prompts=truncate_prompts)
        with showing_progress(_step_display):
            result = run_edit(request, method, model=model, device=device, dtype=dtype)
    output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(output)
    console.print(f"wrote {output} ({result.image.width}x{result.image.height}); "
                  f"{result.method} on {result.model}: NFE {result.nfe}, "
                  + (f"{result.backward_passes} backward passes, " if result.backward_passes else "")
                  + f"{result.wall_seconds:.2f} s, params {result.params}")
    if model == "toy" and result.image.size != (64, 64):
        errors.print(f"[yellow]note:[/yellow] the toy models learnt 64x64 rendered toy scenes "
                     f"(docs/toyworld.md); on a {result.image.width}x{result.image.height} photo "
                     "their edits mean nothing: use a real model (--model sd15, ...)")


@app.command()
def bench(
    methods: Annotated[str, typer.Option(help="Comma-separated method names.")] = "sdedit,instructpix2pix",
    dataset: Annotated[str, typer.Option(help="editeval-v1 (the survey's benchmark; needs --data-dir) or editeval-toy (built offline, with ground truth).")] = "editeval-toy",
    data_dir: Annotated[Path | None, typer.Option(help="Dataset folder (default: $EDITEVAL_V1_DIR for editeval-v1).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts spreadsheet, when it is not inside --data-dir.")] = None,
    model: Annotated[str, typer.Option(help="Suite (toy, sd15, sd21, sdxl, tiny), short name, local path or hub id; toy is shipped and runs offline.")] = "toy",
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/DATASET-MODEL); rerun to resume.")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated task ids (default: all).")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N samples (dataset order, after --tasks).")] = None,
    per_task: Annotated[int | None, typer.Option(help="At most N samples of each task (the first ones), before --limit.")] = None,
    seed: Annotated[list[int], typer.Option(help="Seed, repeatable: one job per (method, sample, seed).")] = [0],
    set_: Annotated[list[str], typer.Option("--set", help="Method parameter METHOD.NAME=VALUE, repeatable.")] = [],
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed/--skip-failed", help="Rerun jobs that failed in an earlier call.")] = True,
    executor: Annotated[str, typer.Option(help="local (this process, one job after another) or ray (workers on a Ray cluster: docs/cluster.md).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="With --executor ray: the cluster to join (its head's HOST:PORT; default $RAY_ADDRESS, else a local Ray instance is started).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="With --executor ray: how many workers (default one per GPU of the cluster, else one per --threads CPUs).")] = None,
) -> None:
    """Edit every sample with every method (resumable: the same command again skips finished jobs)."""
    import importlib.util

    if executor not in ("local", "ray"):
        errors.print(f"[red]error:[/red] --executor {executor!r}: use local or ray", highlight=False)
        raise typer.Exit(2)
    if executor == "local" and (ray_address or workers):
        errors.print("[red]error:[/red] --ray-address and --workers need --executor ray")
        raise typer.Exit(2)
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        errors.print("[red]error:[/red] --executor ray needs Ray, which is not installed: "
                     "pip install 'editeval\\[ray]'", highlight=False)
        raise typer.Exit(2)
    from editeval.bench import ExecutorError, run_bench, summarize
    from editeval.run import NotARunError, Run, RunConfig

    safe_model = re.sub(r"[^\w.-]+", "_", model).strip("_")
    out = out or Path("runs") / f"{dataset}-{safe_model}"
    config = RunConfig(dataset=dataset, methods=_split(methods), model=model, out=out,
                         data_dir=data_dir, prompts_file=prompts, tasks=_split(tasks),
                         limit=limit, per_task=per_task, seeds=seed, params=_parse_params(set_, qualified=True),
                         device=device, dtype=dtype, retry_failed=retry_failed)
    with _clean_errors():
        runner = None
        if executor == "ray":
            from editeval.bench.ray_executor import RayExecutor

            runner = RayExecutor(address=ray_address, workers=workers)
        try:
            summary = run_bench(config, console=errors, executor=runner)
        except ExecutorError as err:  # the Ray cluster cannot be reached or run the workers
            errors.print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            errors.print(f"\n[yellow]interrupted[/yellow]: finished jobs are kept in {out}; "
                         "run the same command again to resume")
            raise typer.Exit(130) from None
        except OSError as err:  # config.json cannot be written: a read-only or full disk
            errors.print(f"[red]error:[/red] {err}", highlight=False)
            raise typer.Exit(1) from None
    try:
        with Run.open(out, readonly=True) as run:
            stats = summarize(run.rows())
    except NotARunError:  # stopped before its first job was recorded
        stats = {}
    table = Table(title=f"{out}  ({summary.done} done and {summary.failed} failed now, "
                        f"{summary.skipped} finished before)")
    for column in ("method", "done", "failed", "mean NFE", "uncached NFE", "backward passes",
                   "mean s/edit"):
        table.add_column(column, justify="left" if column == "method" else "right",
                         overflow="fold")  # a narrow console wraps names, never cuts them
    for name, row in sorted(stats.items()):
        cells = [f"{row[key]:{form}}" if row["done"] and row[key] == row[key] else "-"
                 for key, form in (("mean_nfe", ".0f"), ("mean_uncached_nfe", ".0f"),
                                   ("mean_backward", ".0f"), ("mean_seconds", ".2f"))]
        table.add_row(name, str(row["done"]), str(row["failed"]), *cells)
    console.print(table)
    for name, (count, first) in sorted(summary.warned.items()):
        errors.print(f"[yellow]note:[/yellow] {name}: {count} job{'s' * (count != 1)} with input "
                     f"warnings (stored with each row), e.g. {first}", highlight=False)
    for job_id, error in list(summary.errors.items())[:5]:
        errors.print(f"[red]failed[/red] {job_id}: {error.splitlines()[0]}", highlight=False)
    if summary.failed > 5:
        errors.print(f"... and {summary.failed - 5} more failures (see {out}/results.sqlite)")
    if summary.stopped:
        errors.print(f"[red]stopped:[/red] {summary.stopped}; {summary.not_run} jobs not run: "
                     f"make room (or make {out} writable), then run the same command again to "
                     "resume", highlight=False)
    if summary.failed:
        errors.print(f"[red]{summary.failed} of {summary.done + summary.failed} jobs failed[/red] "
                     f"in this call; their errors are stored in {out}/results.sqlite, and the "
                     "same command again retries them", highlight=False)
    if summary.failed or summary.stopped:
        raise typer.Exit(1)


@app.command()
def score(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `editeval bench`.")],
    judge: Annotated[str | None, typer.Option(help="LMM Score judge: oracle (toy runs), openai:MODEL (any OpenAI-compatible server) or local:MODEL (transformers). Default: oracle, unless only --metrics is given.")] = None,
    mode: Annotated[str, typer.Option(help="comparative (one conversation per source over all methods, the survey's protocol) or per-image.")] = "comparative",
    template: Annotated[Path | None, typer.Option(help="Your own prompt template ({task}, {instruction}, {n_images}).")] = None,
    base_url: Annotated[str | None, typer.Option(help="API root of an OpenAI-compatible server (default $OPENAI_BASE_URL or OpenAI). User info and query parameters are sent, never stored or printed.")] = None,
    api_key_env: Annotated[str, typer.Option(help="Environment variable that holds the API key (the key is never stored).")] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    repeats: Annotated[int, typer.Option(help="Score every item K times; the spread is reported.")] = 1,
    budget: Annotated[int | None, typer.Option(help="At most this many requests in this call (cache hits are free).")] = None,
    temperature: Annotated[float, typer.Option(help="Judge sampling temperature.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for the shuffled order and the judge (seed + repeat).")] = 0,
    max_side: Annotated[int, typer.Option(help="Images are downscaled to this longest side (px) before sending.")] = 512,
    timeout: Annotated[float, typer.Option(help="Seconds per HTTP request (connecting: at most 10).")] = 120.0,
    retry_total: Annotated[float, typer.Option(help="Seconds a request keeps being retried (timeouts, connection failures, 429 honouring Retry-After, 5xx).")] = 300.0,
    structured: Annotated[bool, typer.Option(help="Also ask the server for JSON-schema structured output.")] = False,
    metrics: Annotated[str | None, typer.Option(help="Classic metrics, comma-separated: clip_t, clip_t_edited, clip_i, clip_dir, lpips, psnr, ssim, mse, dino_struct, fid, kid; or 'default' (all but clip_t_edited). Stored per image; a rerun computes only what is missing.")] = None,
    clip_model: Annotated[str | None, typer.Option(help="CLIP for clip_*: hub id, folder, toy (the toy world's CLIP) or tiny. Default openai/clip-vit-large-patch14; toy on toy-model runs.")] = None,
    dino_model: Annotated[str | None, typer.Option(help="ViT for dino_struct: hub id, folder, toy (stand-in: the toy CLIP's image tower) or tiny. Default facebook/dino-vitb8; toy on toy-model runs.")] = None,
    lpips_net: Annotated[str | None, typer.Option(help="LPIPS network: alex, vgg, squeeze (torchvision ImageNet weights) or alex-random (offline stand-in). Default alex; alex-random on toy-model runs.")] = None,
    fid_model: Annotated[str | None, typer.Option(help="FID/KID features: inception (needs torch-fidelity) or a CLIP name (image embeddings). Default inception; toy on toy-model runs.")] = None,
) -> None:
    """Score a run's edits: LMM Score with --judge (the survey's four factors), classic metrics with
    --metrics, or both; prints the leaderboard and the method x task metric tables."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from editeval.judge import Protocol, leaderboard, make_backend, score_run, to_markdown
    from editeval.metrics import (DEFAULT_METRICS, metric_table, metrics_markdown, parse_metrics,
                                  score_metrics)
    from editeval.run import Run

    with _clean_errors(), Run.open(run_dir) as run:
        wanted = None if metrics is None else (
            list(DEFAULT_METRICS) if metrics == "default" else parse_metrics(metrics))
        judge = judge or (None if wanted else "oracle")
        if judge is not None:
            protocol = Protocol.from_file(template, mode) if template else Protocol(mode=mode)
            backend = make_backend(judge, run, base_url=base_url, api_key_env=api_key_env,
                                   budget=budget, temperature=temperature, seed=seed,
                                   max_side=max_side, timeout=timeout,
                                   retry_total=retry_total, structured=structured)
            summary = score_run(run, backend, protocol, concurrency=concurrency,
                                repeats=repeats, seed=seed, console=errors)
            if summary.stopped:  # the server cannot be reached: one line, nothing else
                errors.print(f"[red]error:[/red] {summary.stopped}; stopped with "
                             f"{summary.describe()} now and {summary.not_judged} edit"
                             f"{'s' * (summary.not_judged != 1)} not judged; rerun when the "
                             "server is reachable", highlight=False)
                raise typer.Exit(1)
            table, identity = leaderboard(run, backend.name)
            console.print(to_markdown(table, identity), markup=False, highlight=False)
            sent = (f"{summary.requests} requests sent" if backend.name != "oracle"
                    else "computed by the oracle from ground truth (no model requests)")
            errors.print(f"{sent}; edits judged now: {summary.describe()}; "
                         f"{summary.skipped_items} judged before", highlight=False)
            if summary.budget_exhausted:
                errors.print(f"[yellow]request budget of {budget} spent: "
                             f"{summary.not_judged} edits not judged; rerun to continue")
            unanswered = summary.statuses.get("error", 0)
            if unanswered:
                errors.print(f"[red]error:[/red] {unanswered} edit{'s' * (unanswered > 1)} got "
                             f"no answer (transport error{'s' * (unanswered > 1)}; the causes "
                             f"are in {run.path}/results.sqlite): rerun to retry "
                             f"{'them' if unanswered > 1 else 'it'}", highlight=False)
        if wanted:
            progress = Progress(TextColumn("[bold]metrics"), BarColumn(), MofNCompleteColumn(),
                                console=errors)
            with progress:
                task = progress.add_task("metrics", total=None)
                done = score_metrics(
                    run, wanted, clip_model=clip_model, dino_model=dino_model,
                    lpips_net=lpips_net, fid_model=fid_model,
                    progress=lambda n, total: progress.update(task, completed=n, total=total))
            errors.print("metric values computed now: " + (", ".join(
                f"{m} {n}" for m, n in done.computed.items()) or "none") + "; stored before: "
                + (", ".join(f"{m} {n}" for m, n in done.skipped.items()) or "none"))
            errors.print("backbones: " + ", ".join(f"{m}={b}" for m, b in done.backbones.items()),
                         highlight=False)
            per_image, sets = metric_table(run)
            chosen = set(done.backbones.items())  # this call's (metric, backbone) pairs only
            per_image = per_image[[k in chosen for k in zip(per_image["metric"],
                                                            per_image["backbone"])]]
            if not sets.empty:
                sets = sets[[k in chosen for k in zip(sets["metric"], sets["backbone"])]]
            console.print(metrics_markdown(per_image, sets), markup=False, highlight=False,
                          soft_wrap=True)  # Markdown: no line breaks added
    if judge is not None and summary.statuses.get("error"):
        raise typer.Exit(1)  # edits without an answer: the scoring is not complete


@app.command(name="leaderboard")
def leaderboard_command(
    run_dir: Annotated[Path, typer.Argument(help="A scored run directory.")],
    format: Annotated[str, typer.Option("--format", help="md or csv.")] = "md",
    judge: Annotated[str | None, typer.Option(help="Which judge, when a run has several: its name as stored, or openai:MODEL when one judge has that model.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of the terminal.")] = None,
) -> None:
    """The leaderboard of a scored run: per task and method, mean and std of S_all."""
    from editeval.judge import leaderboard, to_markdown
    from editeval.run import Run

    with _clean_errors():
        if format not in ("md", "csv"):
            raise ValueError(f"--format must be md or csv, not {format!r}")
        with Run.open(run_dir, readonly=True) as run:
            table, identity = leaderboard(run, judge)
    text = to_markdown(table, identity) if format == "md" else table.to_csv(index=False)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        console.print(text, markup=False, highlight=False, end="")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `editeval bench` (scored or not).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Report folder (default RUN_DIR/report); a rebuild redoes only what changed.")] = None,
    judge: Annotated[str | None, typer.Option(help="Which judge's LMM Score, when a run has several.")] = None,
) -> None:
    """An HTML report of a run (leaderboard, plots, one image grid row per sample, filters; opens
    offline by double-click) and Leaderboard.md beside it."""
    from editeval.report import build_report
    from editeval.run import Run

    with _clean_errors(), Run.open(run_dir) as run:
        index = build_report(run, output, judge=judge)
    console.print(f"wrote {index} and {index.parent / 'Leaderboard.md'}", highlight=False)


@app.command()
def methods(
    task: Annotated[str | None, typer.Option(help="Only methods meant for this task.")] = None,
    strategy: Annotated[str | None, typer.Option(help="training-based, test-time-finetuning or training-free.")] = None,
) -> None:
    """List the implemented methods from their cards."""
    from editeval.core import list_methods
    from editeval.core.samples import TASKS
    from editeval.taxonomy import resolve_strategy

    with _clean_errors():
        wanted = resolve_strategy(strategy) if strategy else None
        if task and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    shown = 0
    for card in list_methods():
        if (task and task not in card.tasks) or (wanted and card.strategy != wanted):
            continue
        shown += 1
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim")
        grid.add_column()
        rows = [
            ("paper", str(card.paper)),
            ("strategy", f"{card.strategy} / {card.subcategory or '(not in the survey list)'}"),
            ("needs", f"{', '.join(card.inputs)}  (model kind: {card.model_kind})"),
            ("optional", ", ".join(card.optional_inputs)),
            ("tasks", ", ".join(card.tasks)),
            ("defaults", ", ".join(f"{k}={v}" for k, v in card.defaults.items())),
            ("NFE per edit", card.nfe_formula),
            ("backward passes", "" if card.backward_formula == "0" else card.backward_formula),
            ("deviations", card.deviations),
            ("note", card.note),
        ]
        for key, value in rows:
            if value:
                grid.add_row(key, value)
        console.print(f"[bold]{card.name}[/bold]  {card.title}")
        console.print(grid)
        console.print()
    if not shown:
        console.print("no method matches")


@app.command()
def models() -> None:
    """List the model suites and short names."""
    from editeval.models import ALIASES, KINDS, SUITES

    for suite in SUITES.values():
        console.print(f"[bold]{suite.name}[/bold]  {suite.description}")
        for kind in KINDS:
            checkpoint = suite.checkpoints.get(kind)
            if checkpoint is not None:
                where = "(built or shipped with editeval)" if callable(checkpoint) else checkpoint
                console.print(f"    {kind:<14} {where}", highlight=False)
    console.print("short names: " + ", ".join(sorted(ALIASES)))


@app.command()
def catalog(
    strategy: Annotated[str | None, typer.Option(help="Learning strategy id or name.")] = None,
    subcategory: Annotated[str | None, typer.Option(help="Sub-category id or name.")] = None,
    year: Annotated[int | None, typer.Option(help="Publication year (of the list's date).")] = None,
    search: Annotated[str | None, typer.Option(help="Case-insensitive text in title or venue.")] = None,
    implemented: Annotated[bool, typer.Option("--implemented", help="Only papers editeval implements.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Instead of listing, draw the matching papers' counts per sub-category and year to this file.")] = None,
) -> None:
    """Search the survey's paper catalog; * marks papers editeval implements."""
    from editeval.taxonomy import load_catalog, plot_statistics, query

    with _clean_errors():
        papers = query(strategy=strategy, subcategory=subcategory, year=year, search=search)
    if plot:
        console.print(f"wrote {plot_statistics(papers, plot)} ({len(papers)} entries)")
        return
    done = implemented_papers()
    if implemented:
        papers = [p for p in papers if (p.title, p.subcategory) in done]
    table = Table(title=f"{len(papers)} of {len(load_catalog())} catalog entries")
    for column in ("", "title", "venue", "date", "arXiv", "sub-category", "method"):
        table.add_column(column)
    for p in papers:
        method = done.get((p.title, p.subcategory), "")
        table.add_row("*" if method else "", p.title, p.venue, p.date, p.arxiv_id or "",
                      p.subcategory, method)
    console.print(table)


def implemented_papers() -> dict[tuple[str, str], str]:
    """(title, sub-category) of each catalog entry an implemented method maps to -> method name."""
    from editeval.core import list_methods
    from editeval.taxonomy import find_paper

    found = {}
    for card in list_methods():
        paper = (find_paper(arxiv_id=card.paper.arxiv_id) or find_paper(title=card.paper.title))
        if paper is not None:
            found[(paper.title, paper.subcategory)] = card.name
    return found


study_app = typer.Typer(help="The user study: raters score a run's edits blind to the method in a "
                                  "web app; the analysis compares them with LMM Score and the metrics.",
                             no_args_is_help=True)
app.add_typer(study_app, name="study")
RunDir = Annotated[Path, typer.Argument(help="A run directory made by `editeval bench`.")]
LinkBase = Annotated[str, typer.Option("--url", help="Where raters reach `editeval study serve` (printed links start with it).")]


def _print_links(raters: list, url: str, store) -> None:
    """One line per rater (never a table: a link cut to the terminal's width is useless)."""
    for rater in raters:
        progress = store.progress(rater.rater_id)
        console.print(f"{rater.name}  {url.rstrip('/')}/r/{rater.token}  done "
                      f"{progress.done}/{progress.total}{'  revoked' if rater.revoked_at else ''}",
                      markup=False, highlight=False, overflow="ignore", crop=False)


@study_app.command("add-raters")
def study_add_raters(
    run_dir: RunDir,
    count: Annotated[int, typer.Argument(min=1, help="How many raters to create.")],
    k: Annotated[int | None, typer.Option("--k", help="Ratings each edit should get, from different raters (default 3; kept once set).")] = None,
    layout: Annotated[str | None, typer.Option(help="survey (all methods' edits of one source on a page, the survey's) or per-edit (default survey; fixed once rated).")] = None,
    url: LinkBase = "http://127.0.0.1:8000",
) -> None:
    """Create raters, each with a private link, and balance the work among all raters."""
    from editeval.run import Run
    from editeval.study import StudyStore

    with _clean_errors(), Run.open(run_dir) as run, StudyStore(run) as store:
        settings = store.configure(k, layout)
        made = store.add_raters(count)
        shortfall = store.replan()
        _print_links(made, url, store)
        console.print(f"{len(store.units())} pages ({settings['layout']} layout), "
                      f"k = {settings['k']}; links are secret: send each rater only theirs")
        if shortfall:
            errors.print(f"[yellow]warning:[/yellow] {len(shortfall)} pages cannot get "
                         f"{settings['k']} raters yet: add raters or lower --k", highlight=False)


@study_app.command("raters")
def study_raters(run_dir: RunDir, url: LinkBase = "http://127.0.0.1:8000") -> None:
    """List the raters, their links and progress."""
    from editeval.run import Run
    from editeval.study import StudyStore

    with _clean_errors(), Run.open(run_dir) as run, StudyStore(run) as store:
        _print_links(store.raters(), url, store)


@study_app.command("revoke")
def study_revoke(
    run_dir: RunDir,
    rater: Annotated[int, typer.Argument(help="The rater's number (see `editeval study raters`).")],
) -> None:
    """Revoke a rater's link (their ratings stay); their unstarted pages go to other raters."""
    from editeval.run import Run
    from editeval.study import StudyStore

    with _clean_errors(), Run.open(run_dir) as run, StudyStore(run) as store:
        store.revoke(rater)
    console.print(f"revoked rater {rater}")


@study_app.command("serve")
def study_serve(
    run_dir: RunDir,
    host: Annotated[str, typer.Option(help="Interface to listen on; 127.0.0.1 (this machine only) unless you mean to open the study to a network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Serve the rating pages; every rating is stored the moment it is given."""
    import uvicorn

    from editeval.study.app import create_app

    with _clean_errors():
        web = create_app(run_dir)
    if host not in ("127.0.0.1", "localhost", "::1"):
        errors.print(f"[yellow]note:[/yellow] listening on {host}: anyone who can reach it and "
                     "knows a rater link can rate", highlight=False)
    console.print(f"serving {run_dir} on http://{host}:{port} (Ctrl+C stops; ratings are kept)")
    uvicorn.run(web, host=host, port=port, log_level="warning")


@study_app.command("simulate")
def study_simulate(
    run_dir: RunDir,
    raters: Annotated[int, typer.Option(help="Simulated raters to add.")] = 5,
    noise: Annotated[float, typer.Option(help="Their noise: standard deviation, in rating points, added to the oracle's score before rounding (docs/study.md).")] = 1.5,
    k: Annotated[int | None, typer.Option("--k", help="Ratings per edit.")] = None,
    layout: Annotated[str | None, typer.Option(help="survey or per-edit.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
) -> None:
    """Toy world: raters who rate as the oracle plus noise, to check the analysis on a known answer."""
    from editeval.run import Run
    from editeval.study.simulate import simulate_raters

    with _clean_errors(), Run.open(run_dir) as run:
        done = simulate_raters(run, raters, noise=noise, k=k, layout=layout, seed=seed)
    console.print(f"{len(done.raters)} simulated raters stored {done.ratings} ratings "
                  f"(noise {noise}); planted Pearson r with LMM Score: " + ", ".join(
                      f"{name} {value:.3f}" for name, value in done.planted.items()))


@study_app.command("analyze")
def study_analyze(
    run_dir: RunDir,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the CSVs and figures (default RUN_DIR/study).")] = None,
    judge: Annotated[str | None, typer.Option(help="Which judge's LMM Score, when a run has several.")] = None,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the confidence intervals.")] = 1000,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999, help="Confidence level of the intervals.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Rater agreement, LMM Score's and the metrics' correlation with the human mean, figures, CSV."""
    from editeval.run import Run
    from editeval.study.analyze import analyze, to_markdown

    with _clean_errors(), Run.open(run_dir) as run:
        result = analyze(run, output, judge=judge, resamples=resamples, confidence=confidence,
                         seed=seed)
    console.print(to_markdown(result, confidence), markup=False, highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in result.files.values()), highlight=False)


if __name__ == "__main__":
    app()
