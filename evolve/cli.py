"""`mergekit-evolve GENOME --storage-path DIR [options]`: evolve a merge recipe.

Everything that can be wrong with the input is checked before a worker starts, in this order:
the `evolve` extra → genome file → input models → engine (method, layer counts) → local
placement → storage folder → the record (on --resume) → tasks → Ray resources. Each problem is one
line `error: <field>: <what and the fix>` and exit code 2. The reference tool's options are read
here too (`reference_options`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from merge.errors import EvomergeError
from evolve.run import WANDB_PROJECT, Options, Run, Stopped

# What a search imports beyond the base install: the `evolve` extra (pyproject.toml).
EXTRA_MODULES = {"cma": "cma", "ray": "ray", "lm_eval": "lm-eval",
                 "accelerate": "accelerate", "matplotlib": "matplotlib"}
INSTALL_HINT = "pip install 'evomerge[evolve]'"
DEFAULT_SEED = 42


def _parse_duration(ctx, param, value):
    if value is None:
        return None
    text = str(value).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], None)
    try:
        seconds = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a duration; use seconds or 30m, 2h, 1d")
    if seconds <= 0:
        raise click.BadParameter("must be positive")
    return seconds


def _parse_limit(ctx, param, value):
    from evolve.sweep import parse_limit

    try:
        return parse_limit(value)
    except ValueError as e:
        raise click.BadParameter(str(e))


def _parse_batch_size(ctx, param, value):
    text = str(value).strip()
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()) or (
            text.isdigit() and int(text) > 0):
        return text
    raise click.BadParameter(f"'{value}' is not a positive integer, 'auto' or 'auto:N'")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("genome", metavar="GENOME", type=click.Path(dir_okay=False))
@click.option("--storage-path", type=click.Path(file_okay=False),
              help="Folder for history, checkpoints, report and the best model (required).")
@click.option("--max-fevals", type=click.IntRange(min=1), default=100, show_default=True,
              help="Evaluations in total (the last generation may be cut short).")
@click.option("--popsize", type=click.IntRange(min=2), default=None,
              help="Candidates per generation [default: 4+3 ln(genes), rounded up to a multiple "
                   "of --workers].")
@click.option("--sigma0", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Initial CMA-ES step as a fraction of each gene's range [default: 1/6, the "
                   "reference tool's].")
@click.option("--limit", callback=_parse_limit, default=None,
              help="Items per task per candidate, overriding the genome file's limit (a count, "
                   "or a fraction below 1).")
@click.option("--layer-granularity", type=int, default=None,
              help="Layers per gene block, overriding genome.layer_granularity (0: one block).")
@click.option("--seed", "--random-seed", "seed", type=int, default=None,
              help="Seed of CMA-ES and of random merge methods (DARE...) [default: 42].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray actors evaluating in parallel (each holds the inputs and one model).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs per worker (fractions share a GPU) [default: 1 with --device cuda, "
                   "else 0].")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="CPUs Ray reserves per worker.")
@click.option("--ray-address", default=None,
              help="Join a running Ray cluster (host:port or ray://host:10001) instead of starting "
                   "a local one.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default=None,
              help="lm-eval model backend [default: hf].")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda when GPUs are "
                                             "requested, else cpu].")
@click.option("--batch-size", default="16", show_default=True, callback=_parse_batch_size,
              help="lm-eval batch size (a number, auto or auto:N).")
@click.option("--task-search-path", multiple=True, type=click.Path(file_okay=False),
              help="Folder with lm-eval task YAMLs (repeatable); eval_tasks/ is always searched.")
@click.option("--wandb/--no-wandb", default=None,
              help="Log to Weights & Biases (offline unless you are logged in) [default: off, "
                   "on for the runs of a W&B sweep].")
@click.option("--wandb-project", default=WANDB_PROJECT, show_default=True)
@click.option("--wandb-entity", default=None)
@click.option("--resume", is_flag=True, help="Continue the run in --storage-path.")
@click.option("--repair-history", is_flag=True,
              help="With --resume: keep every readable record of a damaged history.jsonl, move "
                   "the bad lines to history.jsonl.damaged, and continue.")
@click.option("--timeout", callback=_parse_duration, default=None,
              help="Stop after this long (seconds, or 30m, 2h): no new evaluation starts, those "
                   "in flight get a short grace (10-60s) and are then abandoned; resumable.")
@click.option("--eval-timeout", callback=_parse_duration, default=None,
              help="Time limit of one evaluation; past it the worker is killed and replaced and "
                   "the candidate retried once, then recorded as failed [default: adaptive, 5x "
                   "the median evaluation, at least 2m; 30m for a worker's first].")
@click.option("--fidelity", type=click.Choice(["auto", "multi", "full"]), default="auto",
              show_default=True,
              help="multi: score each generation on a small item subset first and only the most "
                   "promising candidates on every item; full: every candidate on every item; "
                   "auto: multi where it pays (see docs/evolve.md).")
@click.option("--objective", type=click.Choice(["weighted", "pareto"]), default="weighted",
              show_default=True,
              help="pareto: every task is an objective (tasks[].goal: maximize|minimize); the "
                   "search keeps a Pareto front, a config per member in STORAGE/pareto/, "
                   "best_config.yaml the front member with the best weighted fitness.")
@click.option("--dry-run", is_flag=True,
              help="Check the genome, print its dimensions and the starting config, and exit.")
@click.option("--merge-best/--no-merge-best", "--save-final-model/--no-save-final-model",
              "merge_best", default=True, show_default=True,
              help="Write the best candidate as a model to STORAGE/best_model at the end "
                   "(STORAGE/final_model links to it).")
@click.option("--cache-magnitudes", is_flag=True,
              help="Keep each task vector's magnitudes sorted in the workers (2 bytes per "
                   "parameter per input model): TIES/breadcrumbs thresholds become lookups.")
@click.option("--trust-remote-code/--no-trust-remote-code", default=False,
              help="Allow model code from model folders.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
# --- the reference tool's options (mergekit-evolve 0.1.5), read as it reads them ------------------
@click.option("--vllm/--no-vllm", "ref_vllm", default=None, hidden=True)
@click.option("--strategy", "-s", "ref_strategy", type=click.Choice(["pool", "buffered", "serial"]),
              default=None, hidden=True)
@click.option("--in-memory/--no-in-memory", "ref_in_memory", default=None, hidden=True)
@click.option("--num-gpus", "ref_num_gpus", type=click.IntRange(min=0), default=None, hidden=True)
@click.option("--merge-cuda/--no-merge-cuda", "ref_merge_cuda", default=None, hidden=True)
@click.option("--allow-crimes/--no-allow-crimes", "ref_allow_crimes", default=None, hidden=True)
@click.option("--i-understand-the-depths-of-the-evils-i-am-unleashing", "ref_allow_benchmarks",
              is_flag=True, hidden=True)
@click.option("--reshard/--no-reshard", "ref_reshard", default=None, hidden=True)
@click.option("--load-in-8bit", "ref_8bit", is_flag=True, hidden=True)
@click.option("--load-in-4bit", "ref_4bit", is_flag=True, hidden=True)
@click.option("--force-population-size", "ref_popsize", type=click.IntRange(min=2), default=None,
              hidden=True)
def cli(**kwargs):
    """Search merge recipes for the models in GENOME with CMA-ES, scoring each candidate with
    lm-eval on a model merged in memory. See docs/evolve.md."""
    kwargs["task_search_path"] = list(kwargs["task_search_path"])
    try:
        kwargs = reference_options(kwargs, note=lambda m: click.echo(f"note: {m}", err=True))
    except EvomergeError as e:
        sys.exit(fail(str(e)))
    sys.exit(run(Options(**kwargs)))


def reference_options(kw: dict, note) -> dict:
    """The reference tool's options mapped onto ours (same meaning), or refused naming ours.
    Removes every `ref_*` key from `kw`."""
    ref = {k: kw.pop(k) for k in list(kw) if k.startswith("ref_")}
    if ref["ref_vllm"] is not None:
        backend = "vllm" if ref["ref_vllm"] else "hf"
        if kw["backend"] not in (None, backend):
            raise EvomergeError(f"--vllm: contradicts --backend {kw['backend']}; give one of them")
        kw["backend"] = backend
    kw["backend"] = kw["backend"] or "hf"
    if ref["ref_strategy"] not in (None, "pool"):
        note(f"--strategy {ref['ref_strategy']}: every strategy is one worker pool here, which "
             f"keeps each worker busy; results do not depend on it")
    if ref["ref_in_memory"] is False:
        note("--no-in-memory: candidates are always merged in memory here; nothing is written "
             "per candidate")
    if ref["ref_num_gpus"] is not None:
        n = ref["ref_num_gpus"]
        if n == 0:
            raise EvomergeError("--num-gpus: 0 GPUs; for a CPU search use --workers N "
                                "--device cpu")
        if kw["workers"] not in (1, n) or kw["gpus_per_worker"] not in (None, 1.0):
            raise EvomergeError(f"--num-gpus: {n} means --workers {n} --gpus-per-worker 1; "
                                f"give either --num-gpus or those options")
        kw["workers"], kw["gpus_per_worker"] = n, 1.0
    if ref["ref_merge_cuda"] is False:
        raise EvomergeError("--no-merge-cuda: merging runs on the device that evaluates; use "
                            "--device cpu to merge and evaluate on the CPU")
    if ref["ref_allow_crimes"]:
        raise EvomergeError("--allow-crimes: a search merges models of one architecture only; "
                            "list models of one architecture in genome.models")
    if ref["ref_reshard"] is not None:
        note("--reshard/--no-reshard: not needed here; each worker reads the input models once "
             "and keeps them in memory")
    if ref["ref_8bit"] or ref["ref_4bit"]:
        bits = "8" if ref["ref_8bit"] else "4"
        raise EvomergeError(f"--load-in-{bits}bit: quantized evaluation is not supported; "
                            f"candidates are evaluated in genome.dtype (bfloat16 unless set)")
    if ref["ref_popsize"] is not None:
        if kw["popsize"] not in (None, ref["ref_popsize"]):
            raise EvomergeError("--force-population-size: the same as --popsize; give one")
        kw["popsize"] = ref["ref_popsize"]
    return kw


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: usage errors become one `error:` line with exit code 2 as well."""
    try:
        args = _hyphenate_long_options(sys.argv[1:] if argv is None else list(argv))
        code = cli.main(args=args, prog_name="mergekit-evolve", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see {e.ctx.command_path} --help)" if e.ctx else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    sys.exit(code or 0)


def _hyphenate_long_options(args: list[str]) -> list[str]:
    """`--layer_granularity=2` → `--layer-granularity=2`: W&B sweep agents spell options as the
    sweep's parameter names (`${args}` → `--name=value`), and Python names use underscores."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def fail(message: str, code: int = 2) -> int:
    click.echo(f"error: {message}", err=True)
    return code


def run(opts: Options) -> int:
    try:
        return _run(opts)
    except EvomergeError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:     # before the search began: nothing to resume
        name = e.args[0] if isinstance(e, Stopped) else "SIGINT"
        click.echo(f"stopped by {name} before the search began; nothing was kept", err=True)
        return e.exit_code if isinstance(e, Stopped) else 130
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in EXTRA_MODULES or top in ("wandb", "datasets", "transformers", "torch"):
            return fail(f"mergekit-evolve: the Python module '{top}' is missing; install the "
                        f"search's dependencies with {INSTALL_HINT}")
        raise


def check_extra(wandb: bool) -> None:
    """One line naming what to install, instead of an import traceback minutes later."""
    import importlib.util

    wanted = dict(EXTRA_MODULES, **({"wandb": "wandb"} if wandb else {}))
    missing = []
    for module, dist in wanted.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    if missing:
        raise EvomergeError(f"mergekit-evolve: {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed; install the "
                            f"search's dependencies with {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
def _run(opts: Options) -> int:
    from evolve.genome import GenomeSpace, load_evolve_config
    from evolve.report import dump_config

    if opts.backend == "vllm":   # an import check only: vLLM itself is imported by the workers
        from evolve.vllm_backend import check_installed

        check_installed()
    from evolve.sweep import apply_overrides, rename_error
    from merge.errors import ConfigError

    if not opts.dry_run:
        check_extra(bool(opts.wandb))
    cfg = load_evolve_config(opts.genome)
    overrides = _storage_and_overrides(opts)
    cfg = apply_overrides(cfg, overrides)
    from evolve.inputs import InputWatch

    inputs = InputWatch(cfg.genome)      # every input found, named by its genome field
    try:
        space = GenomeSpace.build(cfg.genome)
    except ConfigError as e:     # e.g. a --layer-granularity that does not divide the layers
        raise rename_error(e, overrides) from None
    seed = DEFAULT_SEED if opts.seed is None else opts.seed
    x0 = space.initial_vector(random=cfg.random_init, seed=seed)
    config0 = space.decode(x0)

    from merge.config import MergeConfig
    from merge.engine import validate

    validate(MergeConfig.from_dict(config0))          # every engine check; loads no tensor
    if opts.dry_run:
        click.echo(space.describe(x0))
        click.echo("\nstarting point (decoded merge config):\n")
        click.echo(dump_config(config0), nl=False)
        return 0
    if not opts.storage_path:
        raise EvomergeError("--storage-path: required; name a folder for the history, "
                            "checkpoints, report and best model")
    device, gpus = _device_and_gpus(opts)
    if opts.backend == "vllm":
        from evolve.vllm_backend import VllmSettings, check_resources

        check_resources(cfg.vllm or VllmSettings(), device, gpus)
    elif cfg.vllm is not None and not opts.quiet:
        click.echo("note: the genome's vllm: section applies to --backend vllm only", err=True)
    if device.startswith("cuda") and not opts.ray_address:
        import torch

        if not torch.cuda.is_available():   # a local run: the workers are on this machine
            raise EvomergeError(f"--device: {device} requested but this machine has no CUDA GPU "
                                f"that torch can use; drop --device (CPU), or use --ray-address "
                                f"to run the workers on GPU nodes")
    if opts.repair_history and not opts.resume:
        raise EvomergeError("--repair-history: only with --resume (it repairs the history of "
                            "the run being continued)")
    return Run(opts, cfg, space, config0, seed, device, gpus, inputs).execute()


def _storage_and_overrides(opts: Options) -> dict:
    """Settle the storage folder (one per run under a W&B sweep agent, see evolve.sweep) and the
    genome-file overrides (--limit, --layer-granularity; on --resume, those in run.json)."""
    from evolve import sweep

    if opts.storage_path and not opts.dry_run:
        path, why = sweep.resolve_storage_path(opts.storage_path, opts.resume)
        if why and not opts.quiet:
            click.echo(f"storage: {path} ({why})", err=True)
        opts.storage_path = path
        if sweep.sweep_agent() and (Path(path) / "run.json").is_file() and not opts.resume:
            opts.resume = True    # the agent re-runs a preempted run under the same id
    given = {name: getattr(opts, name) for name in sweep.OVERRIDES}
    overrides = sweep.resolve_overrides(given, opts.storage_path, opts.resume)
    for name, value in overrides.items():
        setattr(opts, name, value)      # recorded in run.json by Run._meta
    return overrides


def _device_and_gpus(opts: Options) -> tuple[str, float]:
    gpus = opts.gpus_per_worker
    device = opts.device
    if gpus is None:
        if device is None and not opts.ray_address:
            import torch

            gpus = 1.0 if torch.cuda.is_available() else 0.0
        else:
            gpus = 1.0 if (device or "").startswith("cuda") else 0.0
    if device is None:
        device = "cuda" if gpus > 0 else "cpu"
    if device.startswith("cuda") and gpus == 0:
        raise EvomergeError("--device: cuda needs --gpus-per-worker > 0 so that Ray gives each "
                            "worker a GPU")
    if gpus > 0 and device == "cpu":
        # Only when both are given: Ray reserves the GPU slots (fractions too), while merging and
        # scoring run on the CPU (a cluster whose GPUs serve something else, or a CPU rehearsal
        # of a GPU run with logical GPUs: `ray start --num-gpus N`). See docs/cluster.md.
        return device, gpus
    if gpus > 0 and not device.startswith("cuda"):
        raise EvomergeError(f"--gpus-per-worker: {gpus:g} GPUs requested but --device is {device}; "
                            f"use --device cuda or --gpus-per-worker 0")
    index = device.partition(":")[2]
    if gpus > 0 and index.isdigit() and int(index) >= max(1, int(gpus)):
        # Ray sets CUDA_VISIBLE_DEVICES to each worker's own GPU(s): they are cuda:0, cuda:1 ...
        raise EvomergeError(f"--device: {device} does not exist inside a worker that Ray gives "
                            f"{gpus:g} GPU(s) (it sees them as cuda:0...); use --device cuda")
    return device, gpus
