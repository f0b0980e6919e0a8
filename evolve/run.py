"""One search run: the storage folder, the workers, the CMA-ES loop and the outputs.

`Run` is the search itself; evolve.cli only parses options into `Options`, checks what can be
checked before any worker starts, and hands over.
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
from evolve.inputs import InputWatch
from evolve.placement import check_local_placement, local_cpus, sweep_stale_ray_dirs
from evolve.signals import SignalGuard, Stopped

WANDB_PROJECT = "mergekit-evolve"
# The reference tool's default step. Ours is a fraction of each gene's range, which for the
# reference's genes (weight, density, t: ranges [0, 1]) is the same number.
DEFAULT_SIGMA0 = 1 / 6

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
    wandb: Optional[bool] = None              # None: off, except under a W&B sweep agent
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
    repair_history: bool = False               # --resume past damaged history lines
    eval_timeout: Optional[float] = None       # per evaluation; None: adaptive (evolve.faults)
    fidelity: str = "auto"                     # auto | multi | full (evolve.fidelity)
    objective: str = "weighted"                # weighted | pareto (evolve.pareto)


class Run:
    """One invocation: checks, workers, the search loop, and the outputs."""

    def __init__(self, opts: Options, cfg, space, config0: dict, seed: int, device: str,
                 gpus: float, inputs: Optional[InputWatch] = None):
        self.opts, self.cfg, self.space, self.config0 = opts, cfg, space, config0
        self.seed, self.device, self.gpus = seed, device, gpus
        self.inputs = inputs
        self.bar = None
        self.signals = SignalGuard(self.log)
        self.known_best: Optional[dict] = None   # the best recorded before this invocation
        if opts.wandb is None:    # off, as in the reference tool; on for a W&B sweep's runs
            from evolve.sweep import sweep_agent

            opts.wandb = sweep_agent() is not None

    def log(self, message: str, always: bool = False) -> None:
        """Progress and notes (not with --quiet, unless `always`: what happened to the record)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif always or not self.opts.quiet:
            click.echo(message, err=True)

    def warn(self, message: str) -> None:
        self.log(message, always=True)

    def execute(self) -> int:
        try:
            return self._execute()
        except OSError as e:     # a full disk under the storage folder: one line, resumable
            from evolve import faults

            if not faults.is_disk_full(e) or getattr(self, "store", None) is None:
                raise
            search = getattr(self, "search", None)
            done = search.fevals if search is not None else 0
            needs = faults.storage_needs(self.store.root, max(0, self.opts.max_fevals - done),
                                         faults.model_bytes(self.config0))
            raise faults.disk_full_error(e, self.store.root, needs) from None

    def _execute(self) -> int:
        from evolve.storage import RunStore

        opts = self.opts
        self.signals.install()
        try:
            if not opts.ray_address:     # in a second, before anything is started or written
                check_local_placement(opts.workers, opts.cpus_per_worker, self.gpus)
            store = self.store = RunStore(opts.storage_path)
            identity = {"evolve": self.cfg.model_dump(mode="json", exclude={"vllm"})}
            if store.root.exists() and not store.root.is_dir():
                raise EvomergeError(f"--storage-path: '{store.root}' is a file; give a folder")
            created = store.create()      # None: the folder existed
            owned = False                 # True once the folder is known to be this run's
            try:
                lock = _lock(store.root)  # before looking inside: another search may be starting
            except BaseException:
                if created is not None:
                    import shutil

                    shutil.rmtree(created, ignore_errors=True)
                raise
            try:
                resuming = store.prepare(identity, opts.resume)
                owned = True
                if store.restarted:
                    self.log(f"note: the run in {store.root} never began (no checkpoint); "
                             f"starting it afresh")
                from evolve.console import route_third_party

                route_third_party(store.root / "logs" / "driver.log")
                self.meta = self._meta(identity, resuming)
                self._check_record(resuming)
                if opts.ray_address:   # cheap and common: check it before the slower task loading
                    from evolve.workers import _probe

                    _probe(opts.ray_address)
                self.settings = self._tasks()
                return self._search(resuming)
            except BaseException:
                # failed before the run began: leave no trace (only our own files, and only in a
                # folder that is this run's)
                import shutil

                if not store.begun():
                    if created is not None:
                        shutil.rmtree(created, ignore_errors=True)
                    elif owned:
                        store.clear_unbegun()
                        (store.root / ".lock").unlink(missing_ok=True)
                raise
            finally:
                lock.close()
        finally:
            self.signals.restore()

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
                       "sigma0": opts.sigma0 or DEFAULT_SIGMA0, "seed": self.seed,
                       "dim": self.space.dim},
            # command-line overrides of the genome file, reapplied by --resume
            "overrides": {name: getattr(opts, name) for name in OVERRIDES
                          if getattr(opts, name) is not None},
            # under a W&B sweep agent the run is the agent's (evolve.tracking.init_kwargs)
            "wandb_id": (sweep_agent() or (None, uuid.uuid4().hex[:12]))[1],
            "records_lost": 0,     # history records given up by --repair-history
        }

    def _tasks(self):
        from evolve import tasks as task_lib
        from evolve.fitness import EvalSettings

        cfg, opts = self.cfg, self.opts
        names = [t.name for t in cfg.tasks]
        paths = task_lib.default_search_paths() + [Path(p) for p in opts.task_search_path]
        include = (task_lib.mirror_search_paths(paths, self.store.tasks_dir,
                                                skip=(self.store.root,)) if paths else None)
        tm = task_lib.task_manager(include, names)
        task_lib.check_task_names(tm, names)
        # Loading here also prepares the datasets once, so the workers find them cached.
        loaded = self.loaded = task_lib.load_tasks(tm, names, cfg.num_fewshot, self.seed)
        task_lib.check_metrics(loaded, cfg.tasks)
        batch = opts.batch_size if opts.batch_size.startswith("auto") else int(opts.batch_size)
        return EvalSettings(task_names=names, metrics={t.name: t.metric for t in cfg.tasks},
                            include_dir=str(include) if include else None, limit=cfg.limit,
                            num_fewshot=cfg.num_fewshot, shuffle=cfg.shuffle, seed=self.seed,
                            batch_size=batch, device=self.device,
                            **self._chat_settings())

    def _chat_settings(self) -> dict:
        """apply_chat_template / fewshot_as_multiturn: the genome's, or as the reference tool
        (on) when the evaluated tokenizer has a chat template; off, with a note, when not."""
        cfg = self.cfg
        apply = cfg.apply_chat_template
        if apply is None:
            ref = chat_template_source(self.config0)
            apply = has_chat_template(ref)
            if not apply:
                self.log(f"note: apply_chat_template is off: the tokenizer of '{ref}' has no "
                         f"chat template")
        multiturn = cfg.fewshot_as_multiturn
        if multiturn is None:
            multiturn = apply       # lm-eval refuses multi-turn few-shot without a template
        return {"apply_chat_template": bool(apply), "fewshot_as_multiturn": bool(multiturn)}

    # --- the search ------------------------------------------------------------------------------
    def _check_record(self, resuming: bool) -> None:
        """Before anything starts: the history must hold every record the checkpoint counted.
        A damaged line stops here (store.read_history); records that are gone (an emptied or
        deleted history) are only given up with --repair-history."""
        opts, store = self.opts, self.store
        if not resuming:
            return
        records = store.read_history(repair=opts.repair_history, log=self.warn)
        state = store.load_checkpoint()
        if state is None:
            return
        stats = state.get("stats") or []
        counted = int(stats[-1].get("fevals", 0)) if stats else 0
        lost = int(self.meta.get("records_lost") or 0)
        missing = counted - lost - len(records)
        if missing <= 0:
            pass
        elif not opts.repair_history:
            what = ("is missing" if not store.history.exists() else
                    "is empty" if not records else f"holds {len(records)} records")
            raise EvomergeError(
                f"--resume: {store.history} {what} but the checkpoint counted {counted - lost} "
                f"evaluations; restore it from a backup, or continue without the lost "
                f"records with --repair-history (the best so far is kept)")
        else:
            self.meta["records_lost"] = lost + missing
            self.warn(f"note: continuing without {missing} lost history record(s); "
                     f"{len(records)} kept")
        self.known_best = _best_of(store.read_best(), _best_from_config(store.best_config))

    def _search(self, resuming: bool) -> int:
        from evolve.fitness import weighted_fitness
        from evolve.search import Search
        from evolve.faults import EvalLimits
        from evolve.workers import DIE_ONCE_ENV, RaySession, WorkerPool, WorkerSpec

        opts, store, meta = self.opts, self.store, self.meta
        cpus = local_cpus()
        num_gpus = 0
        if self.gpus and not opts.ray_address:
            import torch

            num_gpus = torch.cuda.device_count()
        if not opts.ray_address:
            sweep_stale_ray_dirs()
        t0 = time.perf_counter()
        # sized to this machine (check_local_placement refused what does not fit), never to the
        # request: Ray would otherwise start every worker on a machine that cannot run them
        session = RaySession(opts.ray_address, num_cpus=cpus, num_gpus=num_gpus)
        self.signals.install()     # after ray.init, which installs a SIGTERM handler of its own
        pool = tracker = search = None
        try:
            session.check_resources(opts.workers, opts.cpus_per_worker, self.gpus)
            ray_seconds = time.perf_counter() - t0
            plan = self._fidelity(resuming)
            store.write_run(meta)
            # `goal: minimize` tasks count against the fitness (users need not flip signs)
            weights = {t.name: -t.weight if t.goal == "minimize" else t.weight
                       for t in self.cfg.tasks}
            search = self.search = Search(
                self.space, store, _search_options(meta, opts, self.cfg, plan, self.goals()),
                fitness=lambda scores: weighted_fitness(scores, weights), log=self.log)
            threads = (max(1, cpus // opts.workers) if not opts.ray_address
                       else max(1, int(opts.cpus_per_worker)))
            spec = WorkerSpec(initial_config=self.config0, eval=self.settings, device=self.device,
                              merge_seed=self.seed, trust_remote_code=opts.trust_remote_code,
                              threads=threads, die_marker=os.environ.get(DIE_ONCE_ENV),
                              backend=opts.backend, cache_magnitudes=opts.cache_magnitudes,
                              log_dir=str(store.root / "logs"),
                              vllm=self.cfg.vllm.model_dump() if self.cfg.vllm else None,
                              dataflow_depth=getattr(self.space, "max_layers", None))
            self.log(f"{'resuming' if resuming else 'starting'}: {self.space.dim} genes, popsize "
                     f"{meta['search']['popsize']}, {search.fevals}/{opts.max_fevals} "
                     f"evaluations done; Ray ready in {ray_seconds:.1f}s, starting "
                     f"{opts.workers} worker(s)")
            for note in self.space.notes + plan.notes:
                self.log(f"note: {note}")
            t1 = time.perf_counter()
            pool = WorkerPool(spec, opts.workers, cpus=opts.cpus_per_worker, gpus=self.gpus,
                              log=self.log, limits=EvalLimits(fixed=opts.eval_timeout))
            self.log(f"workers ready in {time.perf_counter() - t1:.1f}s (model + tasks built in "
                     f"{max(pool.worker_startup):.1f}s per worker); "
                     f"{_describe_placement(pool.placements)}")
            if opts.wandb:
                from evolve.tracking import Tracker, gene_names

                tracker = Tracker(store.root, opts.wandb_project, opts.wandb_entity,
                                  meta["wandb_id"], config=_wandb_config(meta, opts),
                                  resume=resuming, genes=gene_names(self.space),
                                  tasks=[t.name for t in self.cfg.tasks])
            outcome = self._loop(search, pool, tracker)
        except KeyboardInterrupt as e:    # Ctrl-C, or SIGTERM from a scheduler (Stopped)
            self._close_bar()
            name = e.args[0] if isinstance(e, Stopped) else "SIGINT"
            code = e.exit_code if isinstance(e, Stopped) else 130
            if search is None or not store.begun():
                raise
            self._finish_outputs(search, "interrupted", merge=False)
            self.warn(f"stopped by {name} after {search.fevals}/{opts.max_fevals} "
                     f"evaluations; continue with: mergekit-evolve {opts.genome} --storage-path "
                     f"{store.root} --resume")
            return code
        finally:
            self._close_bar()
            if pool is not None:
                pool.shutdown()
            session.shutdown()
        return self._finalize(search, outcome, tracker)

    def goals(self) -> Optional[dict]:
        """Per-task objective directions when the run searches a Pareto front, else None."""
        if self.meta["search"].get("objective", "weighted") != "pareto":
            return None
        return {t.name: t.goal or "maximize" for t in self.cfg.tasks}

    def _fidelity(self, resuming: bool):
        """The run's multi-fidelity plan (evolve.fidelity); a resumed run keeps its mode."""
        from evolve.fidelity import make_plan

        search, s = self.meta["search"], self.settings
        mode = search.get("fidelity", "full") if resuming else self.opts.fidelity
        if resuming and self.opts.fidelity not in ("auto", mode):
            self.log(f"note: --fidelity {self.opts.fidelity} ignored; the resumed run uses {mode}")
        plan = make_plan(mode, self.loaded, s.task_names, s.metrics, s.limit, s.shuffle,
                         s.seed, search["popsize"])
        search["fidelity"] = "multi" if plan.multi else "full"
        if not resuming:
            search["objective"] = self.opts.objective
        return plan

    def _evaluator(self, pool):
        """pool.run, watching the inputs: once a model folder changes no new candidate starts,
        and the run stops (resumable) naming the genome field."""
        from evolve.faults import deadline_grace

        def evaluate(jobs, should_stop):
            def stop() -> bool:
                if self.inputs is not None and self.input_problem is None:
                    self.input_problem = self.inputs.changed()
                return self.input_problem is not None or should_stop()

            yield from pool.run(jobs, stop, grace=deadline_grace(self.opts.timeout))
        self.input_problem: Optional[str] = None
        return evaluate

    def _loop(self, search, pool, tracker):
        from tqdm import tqdm

        opts = self.opts
        self.bar = tqdm(total=opts.max_fevals, initial=search.fevals, unit="eval",
                        desc="evolve", disable=opts.quiet, dynamic_ncols=True, file=sys.stderr)
        best = self.best(search)
        if best:
            self.bar.set_postfix(best=f"{best['fitness']:.4g}")
        state = {"best": best["fitness"] if best else None, "last_report": 0.0}

        def on_record(record):
            if record.get("rung", 0) == 0:
                self.bar.update(1)
            if record.get("error"):
                self.log(f"candidate {record['generation']}.{record['index']} failed: "
                         f"{record['error']}")
                return
            if record.get("full") is False:    # a rung-0 subset score (evolve.fidelity)
                return
            if state["best"] is None or record["fitness"] > state["best"]:
                state["best"] = record["fitness"]
                from evolve.report import write_best_config

                self.store.write_best(record)
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

        outcome = search.run(self._evaluator(pool), on_record, on_generation)
        if self.input_problem:
            self._write_report(search, "stopped: an input model changed")
            raise EvomergeError(self.input_problem)
        return outcome

    def best(self, search) -> Optional[dict]:
        """The best candidate of the whole run: the history's, or the one recorded before this
        invocation when the history lost it (a repaired or emptied history)."""
        return _best_of(self.known_best, search.best() if search is not None else None)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _write_report(self, search, outcome: str) -> None:
        from evolve.report import write_report

        try:
            write_report(self.store, self.space, search.history, search.stats, outcome,
                         goals=self.goals())
        except Exception as e:  # a plotting problem must not end a search (a full disk does)
            from evolve.faults import is_disk_full

            if is_disk_full(e):
                raise
            self.log(f"warning: could not draw the report: {type(e).__name__}: {e}")

    def _finish_outputs(self, search, outcome: str, merge: bool) -> None:
        from evolve.report import merge_best, write_best_config

        if search is None:
            return
        best = self.best(search)
        if best is not None and best is not self.known_best:
            self.store.write_best(best)
            write_best_config(self.store, best, self.seed)
        if self.goals():
            from evolve.report import write_front

            front = write_front(self.store, search.history, self.goals(), self.seed)
            self.log(f"Pareto front: {len(front)} candidate(s), a config each in "
                     f"{self.store.root / 'pareto'}")
        self._write_report(search, outcome)
        if best is not None and merge:
            device = self.device
            if device.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():   # the driver of a GPU cluster may have none
                    device = "cpu"
            self.log(f"merging the best candidate into {self.store.best_model} ({device})")
            merge_best(self.store, best, device, self.seed, self.opts.trust_remote_code)
            _link_final_model(self.store)

    def _finalize(self, search, outcome, tracker) -> int:
        best = self.best(search)
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
                   + (f"\n  model:  {store.best_model}" if self.opts.merge_best else "")
                   + f"\n  logs:   {store.root / 'logs'} (third-party messages)")
        return 0


def _best_of(*records: Optional[dict]) -> Optional[dict]:
    """The record with the highest fitness (the first one on ties)."""
    best = None
    for r in records:
        if r is not None and r.get("fitness") is not None and (
                best is None or r["fitness"] > best["fitness"]):
            best = r
    return best


def _best_from_config(path: Path) -> Optional[dict]:
    """The best recorded in best_config.yaml's header (runs from before best.json existed)."""
    import re

    import yaml

    try:
        text = path.read_text()
    except OSError:
        return None
    m = re.search(r"fitness (\S+) .*\n# generation (\d+), candidate (\d+)", text)
    if not m:
        return None
    try:
        return {"fitness": float(m.group(1)), "generation": int(m.group(2)),
                "index": int(m.group(3)), "scores": {}, "config": yaml.safe_load(text)}
    except (ValueError, yaml.YAMLError):
        return None


def _link_final_model(store) -> None:
    """The reference tool writes STORAGE/final_model: point that name at best_model."""
    link = store.root / "final_model"
    if link.is_symlink() or not link.exists():
        try:
            link.unlink(missing_ok=True)
            link.symlink_to(store.best_model.name, target_is_directory=True)
        except OSError:
            pass        # a filesystem without symlinks: best_model/ is the model


def chat_template_source(config: dict):
    """The model whose tokenizer the candidates are evaluated with (True: the config sets a
    chat template itself)."""
    if config.get("chat_template"):
        return True
    source = config.get("tokenizer_source")
    if source and source not in ("base", "union"):
        return source
    if config.get("base_model"):
        return config["base_model"]
    first = (config.get("models") or [None])[0] or config["slices"][0]["sources"][0]
    return first["model"]


def has_chat_template(ref) -> bool:
    import json

    from merge.sources import ModelRef, resolve_folder

    if ref is True:
        return True
    try:
        folder = resolve_folder(ModelRef.parse(ref), "tokenizer")
    except EvomergeError:
        return False
    if any((folder / n).exists() for n in ("chat_template.jinja", "chat_template.json",
                                            "chat_templates")):
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text())
                    .get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _describe_placement(placements: list[dict]) -> str:
    """`placed on 2 node(s): 1a2b3c4d ×2 (GPU 0, 0), 5e6f7a8b ×1 (GPU 1)`."""
    nodes: dict = {}
    for p in placements:
        nodes.setdefault(p.get("node") or "local", []).append(p.get("gpus") or [])
    parts = []
    for node, gpus in nodes.items():
        ids = ", ".join("+".join(g) for g in gpus if g)
        parts.append(f"{node} ×{len(gpus)}" + (f" (GPU {ids})" if ids else ""))
    return f"placed on {len(nodes)} node(s): " + ", ".join(parts)


def _search_options(meta: dict, opts: Options, cfg, plan=None, goals=None):
    from evolve.search import SearchOptions

    s = meta["search"]
    return SearchOptions(max_fevals=opts.max_fevals, popsize=s["popsize"], sigma0=s["sigma0"],
                         seed=s["seed"], timeout=opts.timeout, random_init=cfg.random_init,
                         fidelity=plan, goals=goals)


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
