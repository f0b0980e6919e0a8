"""`mergekit-evolve GENOME --storage-path DIR [options]`: evolve a merge recipe.

Everything that can be wrong with the input is checked before a worker starts, in this order:
genome file → engine (method, models, layer counts) → storage folder → tasks → Ray resources.
Each problem is one line `error: <field>: <what and the fix>` and exit code 2.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click

from merge.errors import EvomergeError

WANDB_PROJECT = "mergekit-evolve"


@dataclass
class Options:
    genome: str
    storage_path: Optional[str] = None
    max_fevals: int = 100
    popsize: Optional[int] = None
    sigma0: Optional[float] = None
    seed: Optional[int] = None
    workers: int = 1
    gpus_per_worker: Optional[float] = None
    cpus_per_worker: float = 1.0
    ray_address: Optional[str] = None
    backend: str = "hf"
    device: Optional[str] = None
    batch_size: str = "16"
    task_search_path: list[str] = field(default_factory=list)
    wandb: bool = True
    wandb_project: str = WANDB_PROJECT
    wandb_entity: Optional[str] = None
    resume: bool = False
    timeout: Optional[float] = None
    dry_run: bool = False
    merge_best: bool = True
    trust_remote_code: bool = False
    quiet: bool = False
    limit: Optional[float] = None              # overrides the genome file's `limit`
    layer_granularity: Optional[int] = None    # overrides `genome.layer_granularity`
    cache_magnitudes: bool = False


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
              help="Initial CMA-ES step as a fraction of each gene's range [default: 0.25].")
@click.option("--limit", callback=_parse_limit, default=None,
              help="Items per task per candidate, overriding the genome file's limit (a count, "
                   "or a fraction below 1).")
@click.option("--layer-granularity", type=int, default=None,
              help="Layers per gene block, overriding genome.layer_granularity (0: one block).")
@click.option("--seed", type=int, default=None,
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
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="lm-eval model backend.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: cuda when GPUs are "
                                             "requested, else cpu].")
@click.option("--batch-size", default="16", show_default=True, callback=_parse_batch_size,
              help="lm-eval batch size (a number, auto or auto:N).")
@click.option("--task-search-path", multiple=True, type=click.Path(file_okay=False),
              help="Folder with lm-eval task YAMLs (repeatable); eval_tasks/ is always searched.")
@click.option("--wandb/--no-wandb", default=True, show_default=True,
              help="Log to Weights & Biases (offline unless you are logged in).")
@click.option("--wandb-project", default=WANDB_PROJECT, show_default=True)
@click.option("--wandb-entity", default=None)
@click.option("--resume", is_flag=True, help="Continue the run in --storage-path.")
@click.option("--timeout", callback=_parse_duration, default=None,
              help="Stop starting evaluations after this long (seconds, or 30m, 2h); resumable.")
@click.option("--dry-run", is_flag=True,
              help="Check the genome, print its dimensions and the starting config, and exit.")
@click.option("--merge-best/--no-merge-best", default=True, show_default=True,
              help="Write the best candidate as a model to STORAGE/best_model at the end.")
@click.option("--cache-magnitudes", is_flag=True,
              help="Keep each task vector's magnitudes sorted in the workers (2 bytes per "
                   "parameter per input model): TIES/breadcrumbs thresholds become lookups.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from model folders.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cli(**kwargs):
    """Search merge recipes for the models in GENOME with CMA-ES, scoring each candidate with
    lm-eval on a model merged in memory. See docs/evolve.md."""
    kwargs["task_search_path"] = list(kwargs["task_search_path"])
    sys.exit(run(Options(**kwargs)))


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


# ---------------------------------------------------------------------------------------------
def _run(opts: Options) -> int:
    from evolve.genome import GenomeSpace, load_evolve_config
    from evolve.report import dump_config

    if opts.backend == "vllm":   # an import check only: vLLM itself is imported by the workers
        from evolve.vllm_backend import check_installed

        check_installed()
    from evolve.sweep import apply_overrides, rename_error
    from merge.errors import ConfigError

    cfg = load_evolve_config(opts.genome)
    overrides = _storage_and_overrides(opts)
    cfg = apply_overrides(cfg, overrides)
    try:
        space = GenomeSpace.build(cfg.genome)
    except ConfigError as e:     # e.g. a --layer-granularity that does not divide the layers
        raise rename_error(e, overrides) from None
    seed = 42 if opts.seed is None else opts.seed
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
    return Run(opts, cfg, space, config0, seed, device, gpus).execute()


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


class Run:
    """One invocation: checks, workers, the search loop, and the outputs."""

    def __init__(self, opts: Options, cfg, space, config0: dict, seed: int, device: str,
                 gpus: float):
        self.opts, self.cfg, self.space, self.config0 = opts, cfg, space, config0
        self.seed, self.device, self.gpus = seed, device, gpus
        self.bar = None

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif not self.opts.quiet:
            click.echo(message, err=True)

    def execute(self) -> int:
        from evolve.storage import RunStore

        opts = self.opts
        store = self.store = RunStore(opts.storage_path)
        identity = {"evolve": self.cfg.model_dump(mode="json", exclude={"vllm"})}
        created = not store.root.exists()
        resuming = store.prepare(identity, opts.resume)
        if opts.resume and not resuming:
            self.log(f"nothing to resume in {store.root}; starting a new run")
        store.root.mkdir(parents=True, exist_ok=True)
        lock = _lock(store.root)
        try:
            self.meta = self._meta(identity, resuming)
            if opts.ray_address:   # cheap and common: check it before the slower task loading
                from evolve.workers import _probe

                _probe(opts.ray_address)
            self.settings = self._tasks()
            return self._search(resuming)
        except BaseException:
            if not store.run_json.exists():   # failed before the run began: leave no trace
                import shutil

                if created:
                    shutil.rmtree(store.root, ignore_errors=True)
                else:
                    shutil.rmtree(store.tasks_dir, ignore_errors=True)
                    (store.root / ".lock").unlink(missing_ok=True)
            raise
        finally:
            lock.close()

    # --- checks --------------------------------------------------------------------------------
    def _meta(self, identity: dict, resuming: bool) -> dict:
        from evolve.search import default_popsize
        from evolve.sweep import OVERRIDES, sweep_agent

        opts = self.opts
        if resuming:
            meta = self.store.read_run()
            for name in ("popsize", "sigma0", "seed"):
                given = getattr(opts, name)
                if given is not None and given != meta["search"][name]:
                    self.log(f"note: --{name} {given} ignored; the resumed run uses "
                             f"{meta['search'][name]}")
            self.seed = meta["search"]["seed"]
            return meta
        return {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "genome_file": str(Path(opts.genome).resolve()),
            "identity": identity,
            "search": {"popsize": opts.popsize or default_popsize(self.space.dim, opts.workers),
                       "sigma0": opts.sigma0 or 0.25, "seed": self.seed, "dim": self.space.dim},
            # command-line overrides of the genome file, reapplied by --resume
            "overrides": {name: getattr(opts, name) for name in OVERRIDES
                          if getattr(opts, name) is not None},
            # under a W&B sweep agent the run is the agent's (evolve.tracking.init_kwargs)
            "wandb_id": (sweep_agent() or (None, uuid.uuid4().hex[:12]))[1],
        }

    def _tasks(self):
        from evolve import tasks as task_lib
        from evolve.fitness import EvalSettings

        cfg, opts = self.cfg, self.opts
        names = [t.name for t in cfg.tasks]
        paths = task_lib.default_search_paths() + [Path(p) for p in opts.task_search_path]
        include = task_lib.mirror_search_paths(paths, self.store.tasks_dir) if paths else None
        tm = task_lib.task_manager(include, names)
        task_lib.check_task_names(tm, names)
        # Loading here also prepares the datasets once, so the workers find them cached.
        loaded = task_lib.load_tasks(tm, names, cfg.num_fewshot, self.seed)
        task_lib.check_metrics(loaded, cfg.tasks)
        batch = opts.batch_size if opts.batch_size.startswith("auto") else int(opts.batch_size)
        return EvalSettings(task_names=names, metrics={t.name: t.metric for t in cfg.tasks},
                            include_dir=str(include) if include else None, limit=cfg.limit,
                            num_fewshot=cfg.num_fewshot, shuffle=cfg.shuffle, seed=self.seed,
                            batch_size=batch, device=self.device,
                            apply_chat_template=cfg.apply_chat_template,
                            fewshot_as_multiturn=cfg.fewshot_as_multiturn)

    # --- the search ------------------------------------------------------------------------------
    def _search(self, resuming: bool) -> int:
        from evolve.fitness import weighted_fitness
        from evolve.search import Search
        from evolve.workers import DIE_ONCE_ENV, RaySession, WorkerPool, WorkerSpec

        opts, store, meta = self.opts, self.store, self.meta
        local_cpus = os.cpu_count() or 1
        num_gpus = 0
        if self.gpus and not opts.ray_address:
            import torch

            num_gpus = torch.cuda.device_count()
        t0 = time.perf_counter()
        wanted_cpus = int(opts.workers * opts.cpus_per_worker + 0.999)
        session = RaySession(opts.ray_address, num_cpus=max(local_cpus, wanted_cpus),
                             num_gpus=num_gpus)
        pool = tracker = search = None
        try:
            session.check_resources(opts.workers, opts.cpus_per_worker, self.gpus)
            ray_seconds = time.perf_counter() - t0
            store.write_run(meta)
            weights = {t.name: t.weight for t in self.cfg.tasks}
            search = Search(self.space, store, _search_options(meta, opts, self.cfg),
                            fitness=lambda scores: weighted_fitness(scores, weights),
                            log=self.log)
            threads = (max(1, local_cpus // opts.workers) if not opts.ray_address
                       else max(1, int(opts.cpus_per_worker)))
            spec = WorkerSpec(initial_config=self.config0, eval=self.settings, device=self.device,
                              merge_seed=self.seed, trust_remote_code=opts.trust_remote_code,
                              threads=threads, die_marker=os.environ.get(DIE_ONCE_ENV),
                              backend=opts.backend, cache_magnitudes=opts.cache_magnitudes,
                              vllm=self.cfg.vllm.model_dump() if self.cfg.vllm else None)
            self.log(f"{'resuming' if resuming else 'starting'}: {self.space.dim} genes, popsize "
                     f"{meta['search']['popsize']}, {len(search.history)}/{opts.max_fevals} "
                     f"evaluations done; Ray ready in {ray_seconds:.1f}s, starting "
                     f"{opts.workers} worker(s)")
            for note in self.space.notes:
                self.log(f"note: {note}")
            t1 = time.perf_counter()
            pool = WorkerPool(spec, opts.workers, cpus=opts.cpus_per_worker, gpus=self.gpus,
                              log=self.log)
            self.log(f"workers ready in {time.perf_counter() - t1:.1f}s (model + tasks built in "
                     f"{max(pool.worker_startup):.1f}s per worker); {_placement(pool.placements)}")
            if opts.wandb:
                from evolve.tracking import Tracker, gene_names

                tracker = Tracker(store.root, opts.wandb_project, opts.wandb_entity,
                                  meta["wandb_id"], config=_wandb_config(meta, opts),
                                  resume=resuming, genes=gene_names(self.space),
                                  tasks=[t.name for t in self.cfg.tasks])
            outcome = self._loop(search, pool, tracker)
        except KeyboardInterrupt:
            self._close_bar()
            self.log("interrupted; continue with --resume")
            self._finish_outputs(search, "interrupted", merge=False)
            return 130
        finally:
            self._close_bar()
            if pool is not None:
                pool.shutdown()
            session.shutdown()
        return self._finalize(search, outcome, tracker)

    def _loop(self, search, pool, tracker):
        from tqdm import tqdm

        opts = self.opts
        self.bar = tqdm(total=opts.max_fevals, initial=len(search.history), unit="eval",
                        desc="evolve", disable=opts.quiet, dynamic_ncols=True, file=sys.stderr)
        best = search.best()
        if best:
            self.bar.set_postfix(best=f"{best['fitness']:.4g}")
        state = {"best": best["fitness"] if best else None, "last_report": 0.0}

        def on_record(record):
            self.bar.update(1)
            if record.get("error"):
                self.log(f"candidate {record['generation']}.{record['index']} failed: "
                         f"{record['error']}")
                return
            if state["best"] is None or record["fitness"] > state["best"]:
                state["best"] = record["fitness"]
                from evolve.report import write_best_config

                write_best_config(self.store, record, self.seed)
            self.bar.set_postfix(gen=record["generation"], best=f"{state['best']:.4g}")

        def on_generation(stats):
            if tracker is not None:
                g = stats["generation"]
                tracker.log_generation(stats, [r for r in search.history if r["generation"] == g],
                                       search.best(), self.store.best_config)
            # Re-draw the report now and then, so a long run can be watched.
            if time.monotonic() - state["last_report"] > 60:
                self._write_report(search, "running")
                state["last_report"] = time.monotonic()

        return search.run(pool.run, on_record, on_generation)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write_report(self, search, outcome: str) -> None:
        from evolve.report import write_report

        try:
            write_report(self.store, self.space, search.history, search.stats, outcome)
        except Exception as e:  # a plotting problem must not end a search
            self.log(f"warning: could not draw the report: {type(e).__name__}: {e}")

    def _finish_outputs(self, search, outcome: str, merge: bool) -> None:
        from evolve.report import merge_best, write_best_config

        if search is None:
            return
        best = search.best()
        if best is not None:
            write_best_config(self.store, best, self.seed)
        self._write_report(search, outcome)
        if best is not None and merge:
            device = self.device
            if device.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():   # the driver of a GPU cluster may have none
                    device = "cpu"
            self.log(f"merging the best candidate into {self.store.best_model} ({device})")
            merge_best(self.store, best, device, self.seed, self.opts.trust_remote_code)

    def _finalize(self, search, outcome, tracker) -> int:
        best = outcome.best
        self._finish_outputs(search, outcome.reason, merge=self.opts.merge_best)
        if tracker is not None:
            tracker.finish(search.history, self.store.best_config if best else None,
                           outcome.reason, best=best, report_png=self.store.report_png)
        store = self.store
        if best is None:
            click.echo(f"stopped ({outcome.reason}) after {outcome.fevals} evaluations; no "
                       f"candidate succeeded yet — see {store.history}")
            return 1
        scores = ", ".join(f"{k} {v:.4g}" for k, v in best["scores"].items())
        click.echo(f"stopped ({outcome.reason}) after {outcome.fevals} evaluations, "
                   f"{outcome.generations} generation(s)\n"
                   f"best fitness {best['fitness']:.6g} ({scores}) at generation "
                   f"{best['generation']}, candidate {best['index']}\n"
                   f"  config: {store.best_config}\n  report: {store.report_html}"
                   + (f"\n  model:  {store.best_model}" if self.opts.merge_best else ""))
        return 0


def _placement(placements: list[dict]) -> str:
    """`placed on 2 node(s): 1a2b3c4d ×2 (GPU 0, 0), 5e6f7a8b ×1 (GPU 1)`."""
    nodes: dict = {}
    for p in placements:
        nodes.setdefault(p.get("node") or "local", []).append(p.get("gpus") or [])
    parts = []
    for node, gpus in nodes.items():
        ids = ", ".join("+".join(g) for g in gpus if g)
        parts.append(f"{node} ×{len(gpus)}" + (f" (GPU {ids})" if ids else ""))
    return f"placed on {len(nodes)} node(s): " + ", ".join(parts)


def _search_options(meta: dict, opts: Options, cfg):
    from evolve.search import SearchOptions

    s = meta["search"]
    return SearchOptions(max_fevals=opts.max_fevals, popsize=s["popsize"], sigma0=s["sigma0"],
                         seed=s["seed"], timeout=opts.timeout, random_init=cfg.random_init)


def _wandb_config(meta: dict, opts: Options) -> dict:
    return {"genome": meta["identity"]["evolve"], **meta["search"], **meta.get("overrides", {}),
            "workers": opts.workers,
            "max_fevals": opts.max_fevals, "device": opts.device or "auto"}


class _Lock:
    def __init__(self, fh):
        self.fh = fh

    def close(self):
        self.fh.close()


def _lock(root: Path) -> _Lock:
    """One search per storage folder: a second one would interleave the history."""
    import fcntl

    fh = open(root / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise EvomergeError(f"--storage-path: another mergekit-evolve is running on "
                            f"'{root}'; wait for it or use another folder") from None
    return _Lock(fh)
