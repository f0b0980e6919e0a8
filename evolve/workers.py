"""Ray workers: each one loads the input models once, holds one evaluation model, and per candidate
merges the config straight into that model's parameters and scores it with lm-eval.

Ray runs in-process by default (a private local cluster in a temp folder we own); `--ray-address`
joins an existing cluster. Resource requests are checked against the cluster before any actor is
created, because Ray waits forever for resources that no node has.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from merge.errors import EvomergeError

from evolve.faults import HANG_ENV, ClusterHealth, EvalLimits
from evolve.fitness import EvalSettings

# Test hook: a path; the first worker to find it absent creates it and exits mid-evaluation (after
# merging, before scoring), as a crashed or preempted worker would. `node:PATH` takes the worker's
# whole node down instead (SIGKILL to its raylet; never on the head node), as a lost machine
# would. Used by the test suite only.
DIE_ONCE_ENV = "EVOMERGE_TEST_WORKER_EXIT_ONCE"
FREE_WAIT = 10.0   # seconds to wait for resources that are held now before calling them missing


@dataclass
class WorkerSpec:
    """Everything a worker needs (plain data: pickled to every actor)."""

    initial_config: dict            # builds the evaluation model's layout
    eval: EvalSettings
    device: str = "cpu"
    merge_seed: Optional[int] = None
    trust_remote_code: bool = False
    threads: Optional[int] = None
    die_marker: Optional[str] = None
    hang_marker: Optional[str] = None   # test hook: evolve.faults.HANG_ENV
    log_dir: Optional[str] = None       # third-party output goes to LOG_DIR/worker-<pid>.log
    share_inputs: bool = True           # CPU: inputs as views of the node's page cache
    backend: str = "hf"             # hf | vllm
    cache_magnitudes: bool = False  # keep task-vector magnitude orders (MergeOptions)
    vllm: Optional[dict] = None     # the genome's `vllm:` section (vllm_backend.VllmSettings)
    dataflow_depth: Optional[int] = None   # data-flow search: the deepest path (vLLM engine depth)


class EvalWorker:
    """One evaluation model and its inputs. Wrapped with `ray.remote` by WorkerPool."""

    def __init__(self, spec: WorkerSpec):
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.placement = _placement()
        self.error: Optional[str] = None
        self._merged: Optional[dict] = None    # the config the live model holds now
        t0 = time.perf_counter()
        try:
            self._setup(spec)
        except Exception as e:  # reported by info(): a crisp message instead of a Ray traceback
            self.error = _one_line(e)
        self.startup_seconds = time.perf_counter() - t0

    def _setup(self, spec: WorkerSpec) -> None:
        os.environ.setdefault("TQDM_DISABLE", "1")   # lm-eval's bars would only fill Ray's logs
        if spec.log_dir:
            from evolve.console import route_third_party

            route_third_party(Path(spec.log_dir) / f"worker-{os.getpid()}.log")
        import torch

        from merge.config import MergeConfig
        from merge.engine import InMemoryMerger, MergeOptions

        from evolve.fitness import Scorer

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        if spec.backend == "vllm":   # one engine, each candidate swapped in place (docs/vllm.md)
            from evolve.vllm_backend import VllmBackend

            backend = VllmBackend.start(spec)
            self.scorer, self._load = backend.scorer, backend.load
            return
        from evolve.dataflow import is_path_config

        if is_path_config(spec.initial_config):   # layer paths, built from shared layers
            from evolve.path_model import start_hf

            self.scorer, self._load = start_hf(spec)
            return
        self.merger = InMemoryMerger(MergeOptions(device=spec.device, random_seed=spec.merge_seed,
                                                  quiet=True,
                                                  trust_remote_code=spec.trust_remote_code,
                                                  cache_magnitudes=spec.cache_magnitudes))
        config = MergeConfig.from_dict(spec.initial_config)
        if spec.share_inputs:    # one copy of the inputs per node (evolve.shared_inputs)
            from evolve.shared_inputs import share_inputs

            share_inputs(self.merger, config)
        self.model = self.merger.build_model(config)
        tokenizer = _merged_tokenizer(self.merger.plan(config), spec.trust_remote_code)
        self.scorer = Scorer(self.model, tokenizer, spec.eval)
        self._load = lambda cfg: self.merger.merge_into(cfg, self.model)

    def info(self) -> dict:
        return {"worker": self.name, "error": self.error, "startup_seconds": self.startup_seconds,
                **self.placement}

    def evaluate(self, config: dict, samples: Optional[dict] = None) -> dict:
        """Merge `config` into the live model and score it, on `samples` ({task: [item
        index, ...]}) when given, else on the settings' items."""
        from merge.config import MergeConfig

        t0 = time.perf_counter()
        out: dict[str, Any] = {"worker": self.name}
        try:
            if self.error:
                raise EvomergeError(self.error)
            if config != self._merged:      # a promoted candidate's next rung: already merged
                self._merged = None
                self._load(MergeConfig.from_dict(config))
                self._merged = config
            t1 = time.perf_counter()
            self._test_hook_die()
            self._test_hook_hang()
            out["scores"] = self.scorer.score(samples)
            out["merge_seconds"] = t1 - t0
            out["eval_seconds"] = time.perf_counter() - t1
        except Exception as e:  # a failed candidate is data for the search, not a crash
            out["error"] = _one_line(e)
        out["seconds"] = time.perf_counter() - t0
        return out

    def _test_hook_hang(self) -> None:
        marker = self.spec.hang_marker
        if not marker:
            return
        path, _, times = marker.rpartition(":") if marker.rpartition(":")[2].isdigit() else (
            marker, "", "1")
        with open(path, "a+") as f:
            f.seek(0)
            if len(f.read().splitlines()) >= int(times):
                return
            f.write(f"{os.getpid()}\n")
        time.sleep(3600)

    def _test_hook_die(self) -> None:
        marker = self.spec.die_marker
        if not marker:
            return
        whole_node = marker.startswith("node:")
        if whole_node:
            marker = marker[len("node:"):]
            if self.placement.get("head", True):
                return
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        raylet = os.getppid()
        os.write(fd, f"{raylet}\n".encode())
        os.close(fd)
        if whole_node and b"raylet" in Path(f"/proc/{raylet}/cmdline").read_bytes():
            import signal

            os.kill(raylet, signal.SIGKILL)
        os._exit(1)


def _placement() -> dict:
    """Where Ray put this worker: its node, whether that is the head, and the GPUs Ray gave it
    (Ray also sets CUDA_VISIBLE_DEVICES to them, so `cuda` is the worker's own GPU)."""
    import ray

    if not ray.is_initialized():   # not inside a Ray worker (tests build EvalWorker directly)
        return {"node": None, "head": True, "gpus": []}
    try:
        node = ray.get_runtime_context().get_node_id()
        head = any(n.get("NodeID") == node and "node:__internal_head__" in n.get("Resources", {})
                   for n in ray.nodes())
        return {"node": node[:8], "head": head, "gpus": [str(g) for g in ray.get_gpu_ids()]}
    except Exception:
        return {"node": None, "head": True, "gpus": []}


def _merged_tokenizer(plan, trust_remote_code: bool):
    """Exactly the tokenizer mergekit-yaml would write next to this merge (the reference model's,
    or a merged vocabulary with `tokenizer_source: union`), loaded from a scratch folder."""
    from transformers import AutoTokenizer

    from merge.tokenizer import write_tokenizer

    folder = tempfile.mkdtemp(prefix="evomerge-tok-")
    try:
        write_tokenizer(plan, Path(folder))
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


# ---------------------------------------------------------------------------------------------
# Ray session
# ---------------------------------------------------------------------------------------------
class RaySession:
    """A local in-process Ray cluster, a connection to an existing one, or (tests) the session the
    caller already started. Only what we started is shut down."""

    def __init__(self, address: Optional[str], num_cpus: int, num_gpus: int):
        import ray

        self.owned = False
        self.temp_dir: Optional[str] = None
        if address:
            _probe(address)
        if ray.is_initialized():
            return
        if address:
            _join_cluster(address)
        else:
            # Unix socket paths are limited to ~107 bytes and Ray nests ~80 under its folder:
            # use $TMPDIR only when it is short.
            base = tempfile.gettempdir()
            if len(base) > 24 and os.path.isdir("/tmp"):
                base = "/tmp"
            self.temp_dir = tempfile.mkdtemp(prefix="evomerge-ray-", dir=base)
            # Workers import evolve/ and merge/ even from a source checkout that is not installed.
            root = str(Path(__file__).resolve().parent.parent)
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     _temp_dir=self.temp_dir, log_to_driver=False, logging_level="ERROR",
                     namespace="evomerge")
        self.owned = True

    def check_resources(self, workers: int, cpus: float, gpus: float) -> None:
        """Fail now, with the numbers, when the cluster cannot place every worker: Ray itself
        would wait forever for resources that no node has."""
        import ray

        if gpus > 1 and gpus != int(gpus):
            raise EvomergeError(f"--gpus-per-worker: {gpus:g} is neither a fraction of one GPU "
                                f"nor a whole number of GPUs; use e.g. 0.5 (two workers per GPU) "
                                f"or 2")
        total = ray.cluster_resources()
        need = {"CPU": workers * cpus, "GPU": workers * gpus}
        flags = {"CPU": "--cpus-per-worker", "GPU": "--gpus-per-worker"}
        for res, amount in need.items():
            have = total.get(res, 0.0)
            if amount > have + 1e-9:
                fix = f"; lower --workers or {flags[res]}"
                if res == "GPU" and have == 0:
                    fix = (" (no node has a GPU); use --gpus-per-worker 0 (and --device cpu), or "
                           "add GPU nodes (ray start ... --num-gpus N)")
                raise EvomergeError(
                    f"--workers: {workers} worker(s) × {amount / workers:g} {res} need {amount:g} "
                    f"{res} but the Ray cluster has {have:g}{fix}")
        # Totals can suffice while other jobs hold the resources: Ray would queue our actors
        # until they are freed, i.e. possibly forever. What is free now must suffice too.
        # (Actors just killed, e.g. by a previous run in this session, free theirs within a few
        # seconds: wait that long before calling the cluster full.)
        wait_until = time.monotonic() + FREE_WAIT
        while True:
            free = ray.available_resources()
            short = [res for res, amount in need.items() if amount > free.get(res, 0.0) + 1e-9]
            if not short or time.monotonic() > wait_until:
                break
            time.sleep(0.5)
        if short:
            res = short[0]
            amount, have = need[res], free.get(res, 0.0)
            raise EvomergeError(
                f"--workers: {workers} worker(s) × {amount / workers:g} {res} need "
                f"{amount:g} {res} but only {have:g} of the Ray cluster's "
                f"{total.get(res, 0.0):g} are free now (other jobs hold the rest); lower "
                f"--workers or {flags[res]}, or wait for them")
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if gpus > 1:   # a multi-GPU worker has to fit on one node
            per_node = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
            if gpus > per_node:
                raise EvomergeError(f"--gpus-per-worker: {gpus:g} GPUs per worker but no node has "
                                    f"more than {per_node:g}")
        # Totals can suffice while the nodes cannot: a worker never spans two nodes, and a
        # fractional GPU request must fit on one GPU (0.6 + 0.6 do not share a GPU).
        places = [_workers_on_node(n, cpus, gpus) for n in nodes]
        if sum(places) < workers:
            per = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
            raise EvomergeError(
                f"--workers: only {sum(places)} of {workers} worker(s) with {cpus:g} CPU and "
                f"{gpus:g} GPU each fit on the Ray cluster's nodes ({per}); lower --workers, "
                f"--cpus-per-worker or --gpus-per-worker")

    def shutdown(self) -> None:
        import ray

        if self.owned:
            ray.shutdown()
            self.owned = False
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def _workers_on_node(resources: dict, cpus: float, gpus: float) -> int:
    """How many workers one node can hold: fractional GPU requests share a GPU (two 0.5s per
    GPU), whole ones take whole GPUs."""
    import math

    eps = 1e-6
    fits = math.floor(resources.get("CPU", 0.0) / cpus + eps) if cpus > 0 else 10**9
    have = resources.get("GPU", 0.0)
    if 0 < gpus < 1:
        fits = min(fits, math.floor(have + eps) * math.floor(1 / gpus + eps))
    elif gpus >= 1:
        fits = min(fits, math.floor(have / gpus + eps))
    return fits


AUTH_FIX = ("export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN_PATH=FILE, "
            "RAY_AUTH_TOKEN, or ~/.ray/auth_token) before running mergekit-evolve")


def _join_cluster(address: str) -> None:
    """ray.init(address=...) with Ray's C++ retry warnings (printed to fd 2 for ~20 s when the
    cluster refuses us) kept out of the terminal and turned into one line naming the cause."""
    import ray

    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        error: Optional[BaseException] = None
        try:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                     namespace="evomerge")
        except Exception as e:
            error = e
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        if error is None:
            return
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    if "InvalidAuthToken" in text or "Unauthenticated" in text:
        # Ray >= 2.59 turns token authentication on for `ray start --head` whenever a token
        # exists (~/.ray/auth_token, written by any local ray.init()), but never for a client
        # that names an address: both sides must set RAY_AUTH_MODE themselves.
        raise EvomergeError(f"--ray-address: the Ray cluster at '{address}' rejected this "
                            f"driver's authentication token; {AUTH_FIX}")
    raise EvomergeError(f"--ray-address: cannot join the Ray cluster at '{address}': "
                        f"{_one_line(error)}")


def _probe(address: str, timeout: float = 3.0) -> None:
    """Ray retries an unreachable address for minutes: check that something listens first."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise EvomergeError(f"--ray-address: '{address}' is the dashboard/jobs URL; give the "
                            f"cluster address host:port (default port 6379) or ray://host:10001")
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise EvomergeError(f"--ray-address: '{address}' is not host:port (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise EvomergeError(f"--ray-address: nothing answers at {host}:{port} ({e.strerror or e}); "
                            f"start the cluster (ray start --head) or fix the address") from None


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------
class WorkerPool:
    """`workers` actors kept busy: a new candidate goes to whichever actor finishes first.

    Nothing waits without a limit. An actor that dies takes its candidate back into the queue and
    is replaced by a fresh one (up to `max_retries` retries). An evaluation that runs past its
    limit (evolve.faults.EvalLimits) gets its actor killed and replaced, and is retried
    `limits.retries` times, then recorded as failed. Every wait is a short `ray.wait`, so SIGINT
    reaches the driver within a second, and the cluster's health is checked in between
    (evolve.faults.ClusterHealth): a lost raylet or head ends the run with one line."""

    TICK = 1.0   # seconds per ray.wait: how quickly limits, SIGINT and health are noticed

    def __init__(self, spec: WorkerSpec, workers: int, cpus: float = 1, gpus: float = 0,
                 max_retries: int = 2, log: Callable[[str], None] = print,
                 limits: Optional[EvalLimits] = None):
        import ray

        if spec.hang_marker is None and os.environ.get(HANG_ENV):
            spec = replace(spec, hang_marker=os.environ[HANG_ENV])
        self.spec = spec
        self.max_retries = max_retries
        self.limits = limits or EvalLimits()
        self.log = log
        self.deaths = 0
        self.timeouts = 0
        self.health = ClusterHealth()
        self._warm: set = set()     # actors that finished an evaluation (past their first)
        # SPREAD: workers go to different nodes while there is room (more memory bandwidth per
        # worker, and one lost node takes fewer of them); fractions of a GPU still share one.
        self._cls = ray.remote(EvalWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                                    max_task_retries=0,
                                                    scheduling_strategy="SPREAD")
        self.actors = [self._cls.remote(spec) for _ in range(workers)]
        self._starting: dict = {}   # info() refs of replacement actors still starting
        t0 = time.perf_counter()
        try:
            infos = self._wait_started([a.info.remote() for a in self.actors])
        except ray.exceptions.RayActorError as e:   # killed while starting (out of memory, ...)
            self.shutdown()
            raise EvomergeError(f"a worker died while starting: {_one_line(e)}") from None
        except BaseException:
            self.shutdown()
            raise
        for info in infos:
            if info["error"]:
                self.shutdown()
                raise EvomergeError(f"a worker failed to start: {info['error']}")
        self.startup_seconds = time.perf_counter() - t0
        self.worker_startup = [i["startup_seconds"] for i in infos]
        self.placements = infos

    def _wait_started(self, refs: list) -> list[dict]:
        import ray

        deadline = time.monotonic() + self.limits.start
        left = list(refs)
        while left:
            _, left = ray.wait(left, num_returns=len(left), timeout=self.TICK)
            if not left:
                break
            self.health.check()
            if time.monotonic() > deadline:
                raise EvomergeError(f"--workers: {len(left)} worker(s) did not start within "
                                    f"{self.limits.start:g}s (inputs read, model and tasks "
                                    f"built); check the workers' logs, or the cluster's free "
                                    f"resources")
        return ray.get(refs)

    def run(self, jobs: list[tuple], should_stop: Callable[[], bool] = lambda: False,
            grace: float = 60.0) -> Iterator[tuple[Any, dict]]:
        """Evaluate (key, config) or (key, config, samples) jobs; yield (key, result) as each
        finishes. `samples` ({task: [item index, ...]}) picks the items to score (None: the
        settings' own). Once `should_stop()` turns true no new job starts; those in flight may
        finish within `grace` seconds, then they are abandoned (not yielded)."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        queue = deque((job[0], job[1], job[2] if len(job) > 2 else None, 1, 0) for job in jobs)
        idle = list(self.actors)
        now = time.monotonic()
        pending: dict = {ref: ("start", actor, None, now, self.limits.start)
                         for ref, actor in self._starting.items()}
        self._starting = {}
        stop_at: Optional[float] = None
        try:
            while True:
                stopping = should_stop()
                while idle and queue and not stopping:
                    actor, job = idle.pop(), queue.popleft()
                    limit = self.limits.limit(first_on_actor=_key(actor) not in self._warm,
                                              items=_items(job[2]))
                    pending[actor.evaluate.remote(job[1], job[2])] = (
                        "eval", actor, job, time.monotonic(), limit)
                in_flight = [r for r, p in pending.items() if p[0] == "eval"]
                if not in_flight and (not queue or stopping):
                    break
                if not pending:
                    raise EvomergeError("no worker is left to evaluate candidates")
                if stopping and stop_at is None:
                    stop_at = time.monotonic() + grace
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.TICK)
                # every turn, not only when idle: the workers of a node whose raylet died keep
                # answering for a while, and a stream of results must not hide that
                self.health.check()
                if not ready:
                    now = time.monotonic()
                    if stop_at is not None and now > stop_at:
                        self.log(f"--timeout: abandoning {len(in_flight)} evaluation(s) still "
                                 f"running after {grace:g}s of grace; --resume runs them again")
                        for ref in in_flight:
                            self._replace(pending, pending.pop(ref)[1])
                        continue
                    for ref in [r for r, p in pending.items() if now - p[3] > p[4]]:
                        kind, actor, job, started, limit = pending.pop(ref)
                        if kind == "start":
                            raise EvomergeError(f"a replacement worker did not start within "
                                                f"{limit:g}s; check the workers' logs")
                        self.timeouts += 1
                        key, cfg, samples, attempt, timeouts = job
                        self.log(f"candidate {key}: evaluation still running after {limit:.0f}s "
                                 f"(its time limit); worker killed and replaced")
                        self._replace(pending, actor)
                        if timeouts < self.limits.retries:
                            queue.appendleft((key, cfg, samples, attempt + 1, timeouts + 1))
                        else:
                            yield key, {"error": f"evaluation timed out after {limit:.0f}s "
                                                 f"on {timeouts + 1} attempt(s)",
                                        "seconds": now - started, "attempt": attempt}
                    continue
                ref = ready[0]
                kind, actor, job, started, _ = pending.pop(ref)
                if kind == "start":
                    self._started(ref, actor)
                    idle.append(actor)
                    continue
                try:
                    result = ray.get(ref)
                except (RayActorError, WorkerCrashedError) as e:
                    self.health.check(now_please=True)   # the worker, or its whole node?
                    key, cfg, samples, attempt, timeouts = job
                    self.deaths += 1
                    self.log(f"a worker died while evaluating candidate {key} "
                             f"({type(e).__name__}); starting a fresh one")
                    self._replace(pending, actor)
                    if attempt <= self.max_retries:
                        queue.appendleft((key, cfg, samples, attempt + 1, timeouts))
                    else:
                        yield key, {"error": f"the worker died on each of {attempt} attempts",
                                    "seconds": 0.0, "attempt": attempt}
                    continue
                idle.append(actor)
                self._warm.add(_key(actor))
                if not result.get("error"):
                    self.limits.observe(result.get("seconds"), _items(job[2]))
                result["attempt"] = job[3]
                yield job[0], result
        finally:
            self._starting.update({r: p[1] for r, p in pending.items() if p[0] == "start"})

    def _replace(self, pending: dict, actor) -> None:
        """Kill `actor` (dead, hung or abandoned) and start a fresh one in its place."""
        import ray

        if actor in self.actors:
            self.actors.remove(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
        fresh = self._cls.remote(self.spec)
        pending[fresh.info.remote()] = ("start", fresh, None, time.monotonic(), self.limits.start)

    def _started(self, ref, actor) -> None:
        import ray
        from ray.exceptions import RayActorError

        try:
            info = ray.get(ref)
        except RayActorError as e:
            raise EvomergeError(f"a replacement worker died while starting: "
                                f"{_one_line(e)}") from None
        if info["error"]:
            raise EvomergeError(f"a replacement worker failed to start: {info['error']}")
        self.actors.append(actor)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors + list(self._starting.values()):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors, self._starting = [], {}


def _items(samples: Optional[dict]) -> Optional[int]:
    return sum(len(v) for v in samples.values()) if samples else None


def _key(actor) -> str:
    return actor._actor_id.hex()
