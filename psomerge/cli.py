"""Command line: ``psomerge merge | swarm | run | demo | promote | deploy``.

Every command first applies the environment defaults (``orchestration.settings.apply_defaults``):
offline, no telemetry, Prefect's home under the data directory.
"""

from __future__ import annotations

import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from psomerge.errors import PsomergeError

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


def _fail(exc: PsomergeError) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def _parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


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
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            task = progress.add_task(f"{parsed.merge_method}", total=None)

            def tick(name: str) -> None:
                progress.advance(task)

            result = run_merge(parsed, out, max_shard_bytes=_parse_size(shard_size), on_tensor=tick)
    except PsomergeError as exc:
        _fail(exc)
    console.print(
        f"merged {result.num_tensors} tensors ({result.num_parameters / 1e6:.1f}M parameters) "
        f"with {result.method} in {result.seconds:.1f}s -> {result.out_dir}"
    )


@app.command()
def demo(
    data_dir: Annotated[Optional[Path], typer.Option(help="where demo models and caches live (default $PSOMERGE_HOME or ./.psomerge)")] = None,
    preset: Annotated[str, typer.Option(help="tiny: char-level experts built in ~4 min; smollm2: SmolLM2-135M-Instruct "
                                             "and two experts fine-tuned on real data (~25 min on 2 CPU cores)")] = "tiny",
    steps: Annotated[Optional[int], typer.Option(help="PSO steps (default 5 tiny, 3 smollm2); CMA-ES gets the same "
                                                      "number of evaluations")] = None,
    verbose: bool = False,
) -> None:
    """Build the preset's experts (cached), then run the static baselines, PSO-Merging and CMA-ES
    at equal evaluation budgets through the Prefect flow with MLflow tracking, register the
    merges and promote the champion."""
    if preset not in ("tiny", "smollm2"):
        _fail(PsomergeError(f"--preset {preset!r} is not one of tiny, smollm2"))
    if data_dir is not None:
        os.environ["PSOMERGE_HOME"] = str(data_dir.resolve())
    _setup(verbose)
    import yaml

    from psomerge.paths import data_dir as default_data_dir

    root = default_data_dir()
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as progress:
            bars: dict[str, int] = {}

            def on_build(name: str, step: int, total: int) -> None:
                if name not in bars:
                    label = "pretraining base" if name == "base" else f"fine-tuning expert {name}"
                    bars[name] = progress.add_task(label, total=total)
                progress.update(bars[name], completed=step)

            if preset == "tiny":
                from psomerge.presets.tiny import TinySpec, build_tiny, tiny_run_config

                assets = build_tiny(root, TinySpec(), on_build)
                steps = 5 if steps is None else steps
                make_config = partial(tiny_run_config, assets, steps=steps)
                model_name = "psomerge-demo"
            else:
                from psomerge.presets.smollm2 import SmolSpec, build_smollm2, smollm2_run_config

                console.log("SmolLM2-135M preset: converting the GGUF base and fine-tuning two experts "
                            "(once, cached; about 10 minutes on 2 cores)")
                assets = build_smollm2(root, SmolSpec(), on_build)
                steps = 3 if steps is None else steps
                make_config = partial(smollm2_run_config, assets, SmolSpec(), steps=steps)
                model_name = "psomerge-smollm2"
        from psomerge.orchestration.flows import run_flow

        results = {}
        for optimizer, baselines in (("pso", None), ("cmaes", [])):  # baselines once, in the PSO run
            cfg = make_config(optimizer, baselines=baselines)
            path = root / "runs" / f"{cfg.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            console.log(f"running the {optimizer} flow ({path})")
            results[optimizer] = run_flow(path)
    except PsomergeError as exc:
        _fail(exc)
    pso, cmaes = results["pso"], results["cmaes"]
    _print_summary(pso, extra_rows=[r for r in cmaes.rows if r.label == cmaes.merged_label])
    _print_registration("CMA-ES", cmaes)
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
    verbose: bool = False,
) -> None:
    """Run PSO-Merging (or Model Swarms, CMA-ES) in this process and print per-step progress
    and the held-out table (no Prefect, no MLflow)."""
    _setup(verbose)
    from rich.table import Table

    from psomerge.config import RunConfig
    from psomerge.pipeline import run_swarm

    overrides = {k: v for k, v in (("optimizer.type", optimizer), ("optimizer.steps", steps)) if v is not None}
    try:
        if config is None:
            from psomerge.paths import data_dir
            from psomerge.presets.tiny import build_tiny, tiny_run_config

            cfg = tiny_run_config(build_tiny(data_dir()), optimizer or "pso", 5 if steps is None else steps)
        else:
            cfg = RunConfig.load(config, overrides)
        progress = Table(title=f"{cfg.name}: {cfg.optimizer.type} ({cfg.basis.granularity} granularity)",
                         title_justify="left")
        for col in ("step", "global best", *[s.name for s in cfg.suites], "mean", "std", "scorings", "cache hits"):
            progress.add_column(col, justify="right")
        out = Console(width=max(console.width, 110))

        def on_step(r) -> None:
            row = [str(r.step), f"{r.best_fitness:.3f}", *[f"{r.best_scores.get(s.name, 0):.3f}" for s in cfg.suites],
                   f"{r.mean_fitness:.3f}", f"{r.std_fitness:.3f}", str(r.counts.get("scorings", 0)),
                   str(r.counts.get("cache_hits", 0))]
            progress.add_row(*row)
            out.print(" | ".join(f"{c.header}={v}" for c, v in zip(progress.columns, row)))

        result = run_swarm(cfg, resume=resume, on_step=on_step)
    except PsomergeError as exc:
        _fail(exc)
    out.print(progress)
    _print_summary(result)


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

        result = run_flow(config, resume=resume)
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
    from psomerge.judges.vllm_server import VLLMServer
    from psomerge.swarm.plan import parse_size, plan_memory

    try:
        # planned for another host: its data files and vLLM environment need not exist here
        cfg = RunConfig.load(config, check_paths=False)
        servers = [(s.name, float(s.judge.serve.get("memory_fraction", VLLMServer.memory_fraction)))
                   for s in cfg.suites if getattr(s.judge, "serve", None)]
        memory = plan_memory(cfg.base, cfg.experts, cfg.basis, cfg.generation, parse_size(gpu_memory),
                             parse_size(host_memory) if host_memory else None, judge_servers=servers,
                             prompt_tokens=prompt_tokens)
    except PsomergeError as exc:
        _fail(exc)
    typer.echo(f"{cfg.name}: basis.storage {cfg.basis.storage}, generation {cfg.generation.backend}")
    for line in memory.lines():
        typer.echo(line)
    try:
        memory.check()
    except PsomergeError as exc:
        _fail(exc)
    typer.echo("fits")


def _print_summary(result, extra_rows=()) -> None:
    """The held-out table (base, experts, baselines, merges), the run's counts and, for a
    tracked run, its registration."""
    from psomerge.evaluation.report import score_table

    out = Console(width=max(console.width, 110))
    rows = [(r.label, r.heldout) for r in [*result.rows, *extra_rows]]
    out.print(score_table("held-out scores (never read by the search)", rows, result.config.suites))
    c = result.counts
    out.print(f"fitness calls {c.fitness_calls}, scorings {c.scorings}, cache hits {c.cache_hits} "
              f"(Prefect-cached {c.task_cache_hits}), examples scored {c.examples_scored}, generated tokens "
              f"{c.generated_tokens}; judge calls {c.judge_calls}, judge cache hits {c.judge_cache_hits}, judge "
              f"tokens {c.judge_tokens}, judge cost {c.judge_cost:.4f}")
    if result.model_dir is not None:
        out.print(f"merged model: {result.model_dir}")
    if result.registration is not None:
        _print_registration("MLflow", result)


def _print_registration(what: str, result) -> None:
    reg = result.registration
    p = reg.promotion
    console.print(f"{what}: run {reg.run_id}; registered version {reg.version}; "
                  f"champion {'moved' if p['promoted'] else 'kept'}: {p['reason']}")


@app.command()
def promote(
    model_name: Annotated[str, typer.Argument(help="registered model name")],
    margin: Annotated[float, typer.Option(help="held-out margin the candidate must beat the champion by")] = 0.0,
    verbose: bool = False,
) -> None:
    """Move alias 'champion' to 'candidate' when the candidate's held-out score is higher."""
    _setup(verbose)
    from psomerge.orchestration.flows import promote as promote_flow

    decision = promote_flow(model_name, margin)
    console.print(f"{'promoted' if decision['promoted'] else 'not promoted'}: {decision['reason']}")


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="run config YAML")],
    cron: Annotated[str, typer.Option(help="schedule, e.g. '0 3 * * *'")],
    name: Annotated[Optional[str], typer.Option(help="deployment name (default: the config's name)")] = None,
) -> None:
    """Serve the PSO-Merging flow as a scheduled Prefect deployment (needs a Prefect server:
    set PREFECT_API_URL). Runs until interrupted."""
    _setup(False)
    from psomerge.config import RunConfig
    from psomerge.orchestration.flows import pso_merge

    try:
        cfg = RunConfig.load(config)
    except PsomergeError as exc:
        _fail(exc)
    pso_merge.serve(name=name or cfg.name, cron=cron, parameters={"config_path": str(config.resolve())})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
