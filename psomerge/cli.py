"""Command line: ``psomerge merge | swarm | run | demo | promote | deploy``.

Every command first applies the environment defaults (``orchestration.settings.apply_defaults``):
offline, no telemetry, Prefect's home under the data directory.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)

from psomerge.errors import ConfigError, PsomergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Merge expert LLMs by particle swarm optimisation.")
console = Console(stderr=True)


def _setup(verbose: bool) -> None:
    from psomerge.orchestration.settings import apply_defaults

    apply_defaults()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock", "prefect", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


class ConsoleProgress:
    """Progress for a person: bars with counts, elapsed time and ETA on a terminal; where
    output is not a terminal (CI logs, ``make demo > log``), where a bar would show only its
    final state, a line per task every ``every`` seconds and when it ends."""

    def __init__(self, out: Console, every: float = 10.0):
        self.out, self.every = out, every
        self.bars = None
        if out.is_terminal:
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=out)

    def __enter__(self) -> "ConsoleProgress":
        if self.bars is not None:
            self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars is not None:
            self.bars.stop()

    def start(self, what: str, total: int | None):
        if self.bars is not None:
            return _BarTask(self.bars, self.bars.add_task(what, total=total))
        return _LogTask(self.out, what, total, self.every)


class _BarTask:
    def __init__(self, bars: Progress, task_id):
        self.bars, self.task_id = bars, task_id

    def advance(self, n: int = 1) -> None:
        self.bars.advance(self.task_id, n)

    def close(self) -> None:
        self.bars.remove_task(self.task_id)


class _LogTask:
    def __init__(self, out: Console, what: str, total: int | None, every: float):
        import time

        self.out, self.what, self.total, self.every = out, what, total, every
        self.done, self.clock = 0, time.monotonic
        self.started = self.last = self.clock()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.clock() - self.last >= self.every:
            self._line()

    def close(self) -> None:
        if self.clock() - self.started >= self.every:  # short tasks stay quiet
            self._line()

    def _line(self) -> None:
        self.last = self.clock()
        elapsed = self.last - self.started
        text = f"{self.what}: {self.done}" + (f"/{self.total}" if self.total else "") + f", {elapsed:.0f}s"
        if self.total and self.done:
            text += f", ETA {elapsed / self.done * (self.total - self.done):.0f}s"
        self.out.log(text)


def _fail(exc: PsomergeError) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _parse_size(text: str, option: str = "--shard-size") -> int:
    """Bytes of a size such as 2G, 500M, 64K or 1000000; a ConfigError naming ``option`` otherwise."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    given, text = text, text.strip().upper().removesuffix("B")
    scale = units.get(text[-1:], 1)
    try:
        size = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        size = float("nan")
    if not size >= 1 or size == float("inf"):
        raise ConfigError(f"{option} {given!r} is not a positive size (e.g. 2G, 500M, 64K, or bytes)")
    return int(size)


@app.command()
def merge(
    recipe: Annotated[Path, typer.Argument(help="mergekit-style YAML recipe")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    shard_size: Annotated[str, typer.Option(help="maximum shard size, e.g. 2G, 500M")] = "2G",
    verbose: bool = False,
) -> None:
    """Merge checkpoints with a static method (linear, task_arithmetic, ties, dare_*, della*)."""
    _setup(verbose)
    from psomerge.merging.engine import run_merge
    from psomerge.merging.recipe import MergeRecipe

    try:
        parsed = MergeRecipe.load(recipe)
        with ConsoleProgress(console) as progress:
            task = progress.start(f"{parsed.merge_method}: tensors", None)
            result = run_merge(parsed, out, max_shard_bytes=_parse_size(shard_size), on_tensor=lambda _: task.advance())
            task.close()
    except PsomergeError as exc:
        _fail(exc)
    console.print(
        f"merged {result.num_tensors} tensors ({result.num_parameters / 1e6:.1f}M parameters) "
        f"with {result.method} in {result.seconds:.1f}s -> {result.out_dir}"
    )


@app.command()
def demo(
    data_dir: Annotated[Optional[Path], typer.Option(
        help="where demo models and caches live (default $PSOMERGE_HOME or ./.psomerge)")] = None,
    preset: Annotated[str, typer.Option(
        help="tiny: char-level experts built in ~4 min; smollm2: SmolLM2-135M-Instruct "
             "and two experts fine-tuned on real data (~25 min on 2 CPU cores)")] = "tiny",
    steps: Annotated[Optional[int], typer.Option(help="PSO-Merging's steps (default 5 tiny, 3 smollm2); psomerge's "
                                                      "search gets the same number of fitness evaluations")] = None,
    verbose: bool = False,
) -> None:
    """Build the preset's experts (cached), then run the static baselines, psomerge's search and
    PSO-Merging as published at equal evaluation budgets through the Prefect flow with MLflow
    tracking, register the merges and promote the champion."""
    if preset not in ("tiny", "smollm2"):
        _fail(PsomergeError(f"--preset {preset!r} is not one of tiny, smollm2"))
    if data_dir is not None:
        os.environ["PSOMERGE_HOME"] = str(data_dir.resolve())
    _setup(verbose)
    import yaml

    from psomerge.paths import data_dir as default_data_dir

    root = default_data_dir()
    try:
        with ConsoleProgress(console) as progress:
            tasks: dict[str, list] = {}

            def on_build(name: str, step: int, total: int) -> None:
                if name not in tasks:
                    label = "pretraining base" if name == "base" else f"fine-tuning expert {name}"
                    tasks[name] = [progress.start(f"{label}: steps", total), 0]
                task = tasks[name]
                task[0].advance(step - task[1])
                task[1] = step
                if step == total:
                    task[0].close()

            if preset == "tiny":
                from psomerge.presets.tiny import TinySpec, build_tiny, tiny_run_config

                assets = build_tiny(root, TinySpec(), on_build)
                steps = 5 if steps is None else steps
                make_config = partial(tiny_run_config, assets)
                model_name, run_prefix = "psomerge-demo", "demo"
            else:
                from psomerge.presets.smollm2 import SmolSpec, build_smollm2, smollm2_run_config

                console.log("SmolLM2-135M preset: converting the GGUF base and fine-tuning two experts "
                            "(once, cached; about 10 minutes on 2 cores)")
                assets = build_smollm2(root, SmolSpec(), on_build)
                steps = 3 if steps is None else steps
                make_config = partial(smollm2_run_config, assets, SmolSpec())
                model_name, run_prefix = "psomerge-smollm2", "smollm2"
        from psomerge.orchestration.flows import run_flow

        # PSO-Merging as published: 2N+1 particles for steps + 1 rounds; psomerge's search spends no more
        budget = (1 + 2 * len(assets.experts)) * (steps + 1)
        searches = {"psomerge": dict(optimizer=None, name=f"{run_prefix}-psomerge", steps=steps, budget=budget),
                    "paper": dict(optimizer="pso", name=f"{run_prefix}-paper", steps=steps, baselines=[],
                                  preset="paper")}  # baselines once, in the first run
        results = {}
        for what, settings in searches.items():
            cfg = make_config(**settings)
            path = root / "runs" / f"{cfg.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            console.log(f"running the {what} search ({path})")
            with ConsoleProgress(console) as progress:
                results[what] = run_flow(path, progress=progress)
    except PsomergeError as exc:
        _fail(exc)
    ours, paper = results["psomerge"], results["paper"]
    _print_summary(ours, extra_rows=[r for r in paper.rows if r.label == paper.merged_label],
                   counts=_total_counts([ours, paper]))
    _print_registration("PSO-Merging (paper)", paper)
    db = (root / "mlflow.db").resolve()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    prefect_cli = Path(sys.executable).parent / "prefect"
    console.print(f"\nMLflow UI:  {mlflow_cli} ui --backend-store-uri sqlite:///{db}  (then http://127.0.0.1:5000)")
    console.print(f"Prefect UI: {prefect_cli} server start, and set PREFECT_API_URL=http://127.0.0.1:4200/api "
                  "before a run so its flow runs are kept there")
    console.print(f"champion:   models:/{model_name}@champion (models under {assets.root})")


@app.command()
def swarm(
    config: Annotated[Optional[Path], typer.Argument(help="run config YAML (default: the demo experts)")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="pso | model_swarms | cmaes (overrides the config)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimisation steps (overrides the config)")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="repeat the search with this many optimiser seeds and "
                                                   "report the merge's mean and spread")] = 1,
    verbose: bool = False,
) -> None:
    """Run PSO-Merging (or Model Swarms, CMA-ES) in this process and print per-step progress
    and the held-out table (no Prefect, no MLflow)."""
    _setup(verbose)
    from rich.table import Table

    from psomerge.config import RunConfig
    from psomerge.pipeline import run_seeds

    options = {"optimizer.type": ("--optimizer", optimizer), "optimizer.steps": ("--steps", steps)}
    overrides = {key: value for key, (_, value) in options.items() if value is not None}
    try:
        if config is None:
            from psomerge.config import check_optimizer_overrides
            from psomerge.paths import data_dir
            from psomerge.presets.tiny import build_tiny, tiny_run_config

            _with_options(check_optimizer_overrides, options, overrides)  # before building the demo models
            cfg = tiny_run_config(build_tiny(data_dir()), optimizer, 5 if steps is None else steps)
        else:
            cfg = _with_options(partial(RunConfig.load, config), options, overrides)
        steps_table = Table(title=f"{cfg.name}: {cfg.optimizer.type} ({cfg.basis.granularity} granularity)",
                         title_justify="left")
        for col in ("step", "global best", *[s.name for s in cfg.suites], "mean", "std", "scorings", "cache hits"):
            steps_table.add_column(col, justify="right")
        out = Console(width=max(console.width, 110))

        def on_step(r) -> None:
            row = [str(r.step), f"{r.best_fitness:.3f}", *[f"{r.best_scores.get(s.name, 0):.3f}" for s in cfg.suites],
                   f"{r.mean_fitness:.3f}", f"{r.std_fitness:.3f}", str(r.counts.get("scorings", 0)),
                   str(r.counts.get("cache_hits", 0))]
            steps_table.add_row(*row)
            out.print(" | ".join(f"{c.header}={v}" for c, v in zip(steps_table.columns, row)))

        with ConsoleProgress(console) as progress:
            results = run_seeds(cfg, seeds, resume=resume, on_step=on_step, progress=progress)
    except PsomergeError as exc:
        _fail(exc)
    out.print(steps_table)
    if seeds == 1:
        _print_summary(results[0])
        return
    first = results[0]
    merged = [r for r in first.rows if r.label == first.merged_label]
    others = [r for r in first.rows if r.label != first.merged_label]
    per_seed = [replace(r, label=f"{r.label} (seed {res.config.optimizer.seed})")
                for res in results for r in res.rows if r.label == res.merged_label]
    _print_summary(replace(first, rows=others + per_seed), counts=_total_counts(results))
    values = [r.heldout.fitness for r in per_seed]
    out.print(f"{merged[0].label} over {seeds} seeds: held-out weighted mean {statistics.mean(values):.3f} "
              f"± {statistics.stdev(values):.3f} (sd), min {min(values):.3f}, max {max(values):.3f}")


def _with_options(load, options: dict[str, tuple[str, object]], overrides: dict[str, object]):
    """``load(overrides)``; a config error about an overridden section names the command-line
    option that set it (``--steps -3``), not only the config key."""
    from psomerge.errors import ConfigError

    try:
        return load(overrides)
    except ConfigError as exc:
        given = [f"{flag} {overrides[key]}" for key, (flag, _) in options.items()
                 if key in overrides and f"key '{key.split('.')[0]}" in str(exc)]
        if given:
            raise ConfigError(f"{exc} (set on the command line by {', '.join(given)})") from None
        raise


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    resume: Annotated[bool, typer.Option(help="continue a crashed run from its checkpoint")] = False,
    verbose: bool = False,
) -> None:
    """Run the PSO-Merging Prefect flow (tracked in MLflow, registered, promotion-gated)."""
    _setup(verbose)
    try:
        from psomerge.orchestration.flows import run_flow

        with ConsoleProgress(console) as progress:
            result = run_flow(config, resume=resume, progress=progress)
    except PsomergeError as exc:
        _fail(exc)
    _print_summary(result)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    gpu_memory: Annotated[str, typer.Option(help="memory of the GPU the run is planned for, e.g. 80GiB")],
    host_memory: Annotated[Optional[str], typer.Option(help="host memory to check as well, e.g. 512GiB")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length for the transformers backend's activation "
                                                    "estimate")] = 512,
    verbose: bool = False,
) -> None:
    """Print what goes where (GPU, host, page cache) for the config on a GPU of that size, from
    safetensors headers alone (no tensor is read); exit 2 when it does not fit."""
    _setup(verbose)
    from psomerge.config import RunConfig
    from psomerge.swarm.plan import parse_size, plan_memory

    try:
        # planned for another host: its data files and vLLM environment need not exist here
        cfg = RunConfig.load(config, check_paths=False)
        servers = [(s.name, s.judge.serve.memory_fraction) for s in cfg.suites if getattr(s.judge, "serve", None)]
        memory = plan_memory(cfg.base, cfg.experts, cfg.basis, cfg.generation, parse_size(gpu_memory),
                             parse_size(host_memory) if host_memory else None, judge_servers=servers,
                             planned_extras=len(cfg.warm_start.members) if cfg.warm_start else 0,
                             prompt_tokens=prompt_tokens)
    except PsomergeError as exc:
        _fail(exc)
    update = f" (weight_update {cfg.generation.vllm.weight_update})" if cfg.generation.backend == "vllm" else ""
    typer.echo(f"{cfg.name}: basis.storage {cfg.basis.storage}, generation {cfg.generation.backend}{update}")
    for line in memory.lines():
        typer.echo(line)
    try:
        memory.check()
    except PsomergeError as exc:
        _fail(exc)
    typer.echo("fits")


def _total_counts(results):
    from psomerge.pipeline import Counts

    total = Counts()
    for r in results:
        for key, value in r.counts.as_dict().items():
            setattr(total, key, getattr(total, key) + value)
    return total


def _print_summary(result, extra_rows=(), counts=None) -> None:
    """The held-out table (base, experts, baselines, merges), the run's counts and, for a
    tracked run, its registration."""
    from psomerge.evaluation.report import comparison_lines, comparisons, score_table

    out = Console(width=max(console.width, 110))
    rows = [(r.label, r.heldout) for r in [*result.rows, *extra_rows]]
    out.print(score_table("held-out scores (never read by the search, nor by model selection)", rows,
                          result.config.suites))
    for merged in [r.label for r in [*result.rows, *extra_rows] if r.label.startswith("psomerge:")]:
        for line in comparison_lines(comparisons(rows, merged, result.config.suites), merged):
            out.print(line)
    c = counts or result.counts
    out.print(f"fitness calls {c.fitness_calls}, scorings {c.scorings}, cache hits {c.cache_hits} "
              f"(Prefect-cached {c.task_cache_hits}), examples scored {c.examples_scored} (+ {c.selection_examples} "
              f"for model selection), generated tokens {c.generated_tokens}; judge calls {c.judge_calls}, judge "
              f"cache hits {c.judge_cache_hits}, judge tokens {c.judge_tokens}, judge cost {c.judge_cost:.4f}")
    if result.model_dir is not None:
        out.print(f"merged model: {result.model_dir}")
    if result.registration is not None:
        _print_registration("MLflow", result)


def _print_registration(what: str, result) -> None:
    reg = result.registration
    p = reg.promotion
    console.print(f"{what}: run {reg.run_id}; {'reused' if reg.reused else 'registered'} version {reg.version}; "
                  f"champion {'moved' if p['promoted'] else 'kept'}: {p['reason']}")


@app.command()
def promote(
    model_name: Annotated[str, typer.Argument(help="registered model name")],
    margin: Annotated[float, typer.Option(help="score margin the candidate must beat the champion by")] = 0.0,
    confidence: Annotated[float, typer.Option(help="one-sided confidence that the gain exceeds the margin "
                                                   "(paired bootstrap over the same examples)")] = 0.95,
    config: Annotated[Optional[Path], typer.Option(help="the candidate's run config: re-scores a champion "
                                                        "measured on other examples on the same ones")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "psomerge",
    verbose: bool = False,
) -> None:
    """Move alias 'champion' to 'candidate' when the candidate beats it on the same examples,
    beyond noise."""
    _setup(verbose)
    from psomerge.orchestration.flows import run_promote

    try:
        decision = run_promote(model_name, margin, experiment, confidence, str(config) if config else None)
    except PsomergeError as exc:
        _fail(exc)
    console.print(f"{'promoted' if decision['promoted'] else 'not promoted'}: {decision['reason']}")


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    cron: Annotated[Optional[str], typer.Option(help="schedule, e.g. '0 3 * * *'")] = None,
    interval: Annotated[Optional[float], typer.Option(min=1, help="or: a run every SECONDS")] = None,
    name: Annotated[Optional[str], typer.Option(help="deployment name (default: the config's name)")] = None,
) -> None:
    """Serve the PSO-Merging flow as a scheduled Prefect deployment (needs a Prefect server:
    set PREFECT_API_URL), one run at a time. Runs until interrupted."""
    _setup(False)
    from psomerge.config import RunConfig
    from psomerge.orchestration.server import require_api

    try:
        if (cron is None) == (interval is None):
            raise PsomergeError("give one schedule: --cron '0 3 * * *' or --interval SECONDS")
        cfg = RunConfig.load(config)
        url = require_api()  # before serving: without a server, serve would start a temporary one and hang
    except PsomergeError as exc:
        _fail(exc)
    from psomerge.orchestration.flows import pso_merge

    console.print(f"serving deployment {name or cfg.name!r} of flow pso-merge on {url} "
                  f"({'cron ' + cron if cron else f'every {interval:g} s'}); Ctrl-C stops")
    # one run at a time: runs of one config share its run folder, caches and resident models
    pso_merge.serve(name=name or cfg.name, cron=cron, interval=interval, limit=1,
                    parameters={"config_path": str(config.resolve())})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
