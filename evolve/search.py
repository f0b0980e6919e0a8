"""CMA-ES over the genome, with ask/tell around an evaluator we own.

One generation:
    ask → checkpoint (state + the asked candidates) → evaluate (each result appended to history)
        → tell → checkpoint (next generation)
A killed run resumes from the checkpoint: the same asked candidates, and those already in the
history are reused instead of re-evaluated. CMA-ES maximises fitness here by minimising −fitness;
a failed or NaN evaluation is recorded with its error and told to CMA-ES as worse than every
success, so the search steers away from it instead of crashing.
"""
from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from merge.errors import EvomergeError

from evolve.genome import GenomeSpace
from evolve.signals import held
from evolve.storage import RunStore

Evaluator = Callable[[list[tuple[int, dict]], Callable[[], bool]], Iterator[tuple[int, dict]]]


@dataclass
class SearchOptions:
    max_fevals: int = 100
    popsize: Optional[int] = None
    sigma0: float = 0.25          # initial step, as a fraction of each gene's range
    seed: int = 42
    timeout: Optional[float] = None   # seconds of wall time for this invocation
    random_init: bool = False
    fidelity: Optional[Any] = None    # evolve.fidelity.FidelityPlan; None: the workers' items
    goals: Optional[dict] = None      # task -> maximize|minimize: Pareto ranks (evolve.pareto)


@dataclass
class Outcome:
    reason: str                   # why the search stopped
    fevals: int
    generations: int
    best: Optional[dict]


def default_popsize(dim: int, workers: int) -> int:
    """CMA-ES's default 4 + 3 ln(n), rounded up to a multiple of the workers so none idles."""
    n = 4 + int(3 * math.log(max(dim, 1)))
    return -(-n // workers) * workers


def new_strategy(space: GenomeSpace, popsize: int, sigma0: float, seed: int, random_init: bool):
    import cma

    lower, upper = space.lower, space.upper
    opts = {
        "bounds": [lower, upper],
        # the step per gene is sigma × its range: genes with different ranges move alike
        "CMA_stds": [hi - lo for lo, hi in zip(lower, upper)],
        "popsize": popsize,
        "seed": seed if seed > 0 else 2**31 - 1 + seed,   # cma reads seed 0 as "random"
        "verbose": -9,
        # The budget is --max-fevals. lm-eval scores are discrete (accuracy on a few hundred
        # items), so equal fitness across a generation is common; cma's flat-fitness and
        # function-value tolerances would end such a search after a generation or two.
        "tolflatfitness": 10**9, "tolfun": 0, "tolfunhist": 0, "tolstagnation": 10**9,
    }
    if space.dim == 1:
        opts["maxstd_boundrange"] = 10   # cma's std cap is broken in one dimension
    x0 = space.initial_vector(random=random_init, seed=seed)
    return cma.CMAEvolutionStrategy(x0, sigma0, opts)


def objective_values(records: list[dict]) -> list[float]:
    """−fitness per record; failures get a value worse than every success seen so far."""
    good = [-r["fitness"] for r in records if r.get("fitness") is not None]
    worst = max(good) if good else 0.0
    spread = (max(good) - min(good)) if len(good) > 1 else 0.0
    penalty = worst + max(1.0, spread)
    return [-r["fitness"] if r.get("fitness") is not None else penalty for r in records]


class Search:
    def __init__(self, space: GenomeSpace, store: RunStore, options: SearchOptions,
                 fitness: Callable[[dict[str, float]], float], log: Callable[[str], None] = print):
        self.space = space
        self.store = store
        self.options = options
        self.fitness = fitness
        self.log = log
        self.history = store.read_history()
        state = store.load_checkpoint()
        if state is None:
            if self.history:
                raise EvomergeError(f"--resume: {store.history} exists but the checkpoint is "
                                    f"missing; the run cannot be continued, start a new one")
            self.es = new_strategy(space, options.popsize, options.sigma0, options.seed,
                                   options.random_init)
            state = {"generation": 0, "asked": None, "stats": [], "es_blob": None}
            self._asked_arrays = None
        else:
            self.es = self._restore(state)
        self.state = state

    # The checkpoint holds CMA-ES as it was *before* asking for the in-flight generation, with
    # numpy's global RNG state (cma samples from it). Re-asking after a resume reproduces the
    # same candidates bit for bit and lets cma file them under this process's hash keys: cma
    # finds each told solution's genotype by hashing it, and Python's hashes of bytes differ
    # between processes, so an es pickled *after* ask would not recognise its own candidates.
    def _snapshot(self) -> bytes:
        import numpy as np

        return pickle.dumps((self.es, np.random.get_state()))

    def _restore(self, state: dict):
        import numpy as np

        es, rng = pickle.loads(state["es_blob"])
        np.random.set_state(rng)
        self._asked_arrays = None
        if state["asked"] is not None:
            again = es.ask()
            saved = [np.asarray(x, dtype=float) for x in state["asked"]]
            if all(np.array_equal(a, b) for a, b in zip(again, saved)) and len(again) == len(saved):
                self._asked_arrays = again
            else:  # another numpy/cma version: keep the saved candidates, cma copes
                self.log("note: CMA-ES did not reproduce the in-flight generation exactly; "
                         "continuing with the saved candidates")
                self._asked_arrays = saved
        return es

    # --- views -----------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self.state["generation"]

    @property
    def stats(self) -> list[dict]:
        return self.state["stats"]

    @property
    def fevals(self) -> int:
        """Candidates evaluated (a multi-fidelity candidate scored further counts once)."""
        return sum(1 for r in self.history if r.get("rung", 0) == 0)

    def best(self) -> Optional[dict]:
        """The best full-fidelity result (a score on a rung-0 subset is not comparable)."""
        done = [r for r in self.history if r.get("fitness") is not None and r.get("full", True)]
        return max(done, key=lambda r: r["fitness"]) if done else None

    # --- the loop -------------------------------------------------------------------------------
    def run(self, evaluate: Evaluator, on_record: Callable[[dict], None] = lambda r: None,
            on_generation: Callable[[dict], None] = lambda s: None) -> Outcome:
        opts = self.options
        deadline = time.monotonic() + opts.timeout if opts.timeout else None
        timed_out = lambda: deadline is not None and time.monotonic() >= deadline  # noqa: E731
        reason = "max-fevals"
        while True:
            if self.fevals >= opts.max_fevals:
                reason = "max-fevals"
                break
            if timed_out():
                reason = "timeout"
                break
            if self.state["asked"] is None:
                stop = self.es.stop()
                if stop:
                    reason = "converged (" + ", ".join(stop) + ")"
                    break
                with held():
                    self.state["es_blob"] = self._snapshot()
                    self._asked_arrays = self.es.ask()
                    self.state["asked"] = [list(map(float, x)) for x in self._asked_arrays]
                    self.store.save_checkpoint(self.state)
            g, asked = self.generation, self.state["asked"]
            plan = opts.fidelity if opts.fidelity is not None and opts.fidelity.multi else None
            rung0 = {r["index"]: r for r in self.history
                     if r["generation"] == g and r.get("rung", 0) == 0}
            budget = opts.max_fevals - self.fevals
            todo = [i for i in range(len(asked)) if i not in rung0][:budget]
            configs = {i: self.space.decode(asked[i]) for i in range(len(asked))}
            low = plan.low_items(g) if plan else None
            self._evaluate(evaluate, timed_out, g, asked, configs, todo, low, 0, rung0, on_record)
            if len(rung0) < len(asked):
                reason = "timeout" if timed_out() else "max-fevals"
                break
            records = [rung0[i] for i in range(len(asked))]
            if all(r.get("fitness") is None for r in records):
                raise EvomergeError(f"every candidate of generation {g} failed, e.g. "
                                    f"{records[0].get('error')}; see {self.store.history}, fix "
                                    f"the cause and start a new run (--resume would reuse these "
                                    f"results)")
            if plan:
                rung1 = {r["index"]: r for r in self.history
                         if r["generation"] == g and r.get("rung") == 1}
                promoted = plan.promoted({i: r.get("fitness") for i, r in rung0.items()},
                                         len(asked))
                rest = plan.rest_items(low)
                self._evaluate(evaluate, timed_out, g, asked, configs,
                               [i for i in promoted if i not in rung1], rest, 1, rung1, on_record,
                               combine=lambda i, scores: plan.combine(
                                   rung0[i]["scores"], scores, low, rest))
                if len(rung1) < len(promoted):
                    reason = "timeout" if timed_out() else "max-fevals"
                    break
                records = [rung1.get(i, rung0[i]) for i in range(len(asked))]
            with held():     # told, counted and checkpointed together, or not at all
                if plan or opts.goals:
                    from evolve import fidelity, pareto

                    entries = [{"fitness": r.get("fitness"), "full": r.get("full", True),
                                "scores": r.get("scores")} for r in records]
                    values = (pareto.optimizer_values(entries, opts.goals) if opts.goals
                              else fidelity.optimizer_values(entries))
                    self.es.tell(self._asked_arrays, values)
                else:
                    # Penalties are relative to everything seen so far: a failure always ranks last.
                    penalties = objective_values(self.history)
                    by_key = {(r["generation"], r["index"]): v
                              for r, v in zip(self.history, penalties)}
                    self.es.tell(self._asked_arrays, [by_key[(g, i)] for i in range(len(asked))])
                stats = self._stats(g, records)
                self.stats.append(stats)
                self.state["generation"] = g + 1
                self.state["asked"] = None
                self._asked_arrays = None
                self.state["es_blob"] = self._snapshot()
                self.store.save_checkpoint(self.state)
            on_generation(stats)
        return Outcome(reason, self.fevals, self.generation, self.best())

    def _evaluate(self, evaluate, timed_out, g, asked, configs, todo, samples, rung, done,
                  on_record, combine=None) -> None:
        """Evaluate candidates `todo` of generation `g` on `samples` (None: the workers' own
        items); record each result as it arrives (into `done` too)."""
        plan = self.options.fidelity
        jobs = [(i, configs[i]) if samples is None else (i, configs[i], samples) for i in todo]
        for i, result in evaluate(jobs, timed_out):
            if combine is not None and result.get("scores") is not None and not result.get(
                    "error"):
                result = {**result, "scores": combine(i, result["scores"])}
            record = self._record(g, i, asked[i], configs[i], result)
            if plan is not None:
                record["rung"] = rung
                record["items"] = plan.describe_items(g, rung)
                record["full"] = not plan.multi or rung == 1
            with held():     # the file and the search's list agree whenever a stop comes
                self.store.append(record)
                self.history.append(record)
                done[i] = record
            on_record(record)

    def _record(self, g: int, i: int, genome: list[float], config: dict, result: dict) -> dict:
        scores = result.get("scores")
        error = result.get("error")
        fitness = None
        bad = [t for t, v in (scores or {}).items()
               if not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:   # never let NaN into the history (JSON) or into CMA-ES
            error = error or f"task '{bad[0]}' scored {scores[bad[0]]}"
            scores = {t: (None if t in bad else v) for t, v in scores.items()}
        if scores is not None and error is None:
            try:
                fitness = self.fitness(scores)
                if not math.isfinite(fitness):
                    error, fitness = f"fitness is {fitness}", None
            except Exception as e:  # e.g. a task missing from the scores
                error = f"{type(e).__name__}: {e}"
        return {"generation": g, "index": i, "genome": genome, "config": config,
                "scores": scores, "fitness": fitness, "error": error,
                "seconds": round(float(result.get("seconds", 0.0)), 4),
                "merge_seconds": _round(result.get("merge_seconds")),
                "eval_seconds": _round(result.get("eval_seconds")),
                "worker": result.get("worker"), "attempt": result.get("attempt", 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _stats(self, g: int, records: list[dict]) -> dict:
        """`records`: each candidate's final record (with multi-fidelity, a promoted candidate's
        full score and the others' rung-0 scores)."""
        fits = [r["fitness"] for r in records if r.get("fitness") is not None]
        best = self.best()
        every = [r for r in self.history if r["generation"] == g]
        top = max(fits)
        if any(r.get("full") is False for r in records):
            # multi-fidelity: the generation's best is its best full score, never a lucky
            # subset score; mean and worst are over every candidate's rung-0 (subset) score
            full = [r["fitness"] for r in records if r.get("full") and r.get("fitness") is not None]
            top = max(full) if full else top
            fits = [r["fitness"] for r in every
                    if r.get("rung") == 0 and r.get("fitness") is not None]
        out = {"generation": g, "best": top, "mean": sum(fits) / len(fits),
               "worst": min(fits), "failed": sum(1 for r in records if r.get("fitness") is None),
               "best_so_far": best["fitness"] if best else None,
               "sigma": float(self.es.sigma), "fevals": self.fevals,
               "seconds": sum(r.get("seconds") or 0.0 for r in every)}
        if any("items" in r for r in every):
            out["items"] = sum((r.get("items") or {}).get("scored", 0) for r in every)
        return out


def _round(v: Any) -> Optional[float]:
    return None if v is None else round(float(v), 4)
