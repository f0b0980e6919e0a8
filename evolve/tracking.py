"""Weights & Biases logging: one run per search (the same run again on --resume).

Offline unless credentials are configured: without an API key we set WANDB_MODE=offline and the run
is written under <storage>/wandb/offline-run-*/ (upload later with `wandb sync`). An explicit
WANDB_MODE from the environment wins. Under a sweep agent the run is the agent's (it chose the id,
project and entity); we only add to it. What is logged is described in docs/wandb.md.

Everything logged is built by the pure functions below (testable without W&B); the Tracker only
hands their results to wandb.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Optional

# The x-axis of every per-generation chart. We never pass `step=` to run.log: W&B's own step
# counter keeps increasing across a resume, whereas generation numbers could collide with it.
STEP_METRIC = "generation"
PER_GENERATION = ("fitness/*", "cma/*", "best/*", "evaluations", "failed", "seconds", "items")
CANDIDATES_TABLE = "candidates"            # this generation's candidates, one table per generation
EVALUATIONS_TABLE = "evaluations_table"    # every evaluation, once at the end
SWEEP_METRIC = "fitness/best_so_far"       # what configs/sweeps/*.yaml maximise
ARTIFACT_TYPE = "merge-config"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or str(Path.home() / ".netrc"))
    except (OSError, netrc.NetrcParseError):
        return False
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1]
    return rc.authenticators(host.rstrip("/")) is not None


# --- payloads (pure) ----------------------------------------------------------------------------
def generation_metrics(stats: dict, best: Optional[dict]) -> dict:
    """The per-generation metrics."""
    out = {STEP_METRIC: stats["generation"], "fitness/best": stats["best"],
           "fitness/mean": stats["mean"], "fitness/worst": stats["worst"],
           "fitness/best_so_far": stats["best_so_far"], "cma/sigma": stats["sigma"],
           "evaluations": stats["fevals"], "failed": stats["failed"]}
    if stats.get("seconds") is not None:
        out["seconds"] = stats["seconds"]
    if stats.get("items") is not None:     # items scored this generation (evolve.fidelity)
        out["items"] = stats["items"]
    for task, score in ((best or {}).get("scores") or {}).items():
        out[f"best/{task}"] = score
    return out


def gene_names(space) -> list[str]:
    """A readable, unique column name per gene of a GenomeSpace, e.g. `weight[c0, layers 0-1, mlp]`:
    the parameter, then the model (per-model genes), the layer block (when there are several) and
    the filter group (when there are filters; `rest` is the catch-all)."""
    from evolve.genome import short_name

    shorts = [short_name(m) for m in space.inputs]
    label = {m: (s if shorts.count(s) == 1 else m) for m, s in zip(space.inputs, shorts)}
    names = []
    for gene in space.genes:
        parts = []
        if gene.model is not None:
            parts.append(label[gene.model])
        if space.num_blocks > 1:
            parts.append(space.block_label(gene.block))
        if space.groups != [None]:
            parts.append(gene.filter or "rest")
        names.append(f"{gene.param}[{', '.join(parts)}]" if parts else gene.param)
    return names


def task_names(records: list[dict], configured: Optional[list[str]] = None) -> list[str]:
    """The tasks to give a column: the configured ones, then any other a record scored."""
    seen = list(configured or [])
    for r in records:
        seen += [t for t in (r.get("scores") or {}) if t not in seen]
    return seen


def candidate_columns(genes: list[str], tasks: list[str]) -> list[str]:
    return ["generation", "index", "fitness", *tasks, *genes, "seconds", "worker", "error"]


def candidate_rows(records: list[dict], genes: list[str], tasks: list[str]) -> list[list]:
    """One row per evaluation, in the order of candidate_columns. A genome of another length
    than `genes` (not expected) leaves the gene cells empty rather than misaligning them."""
    rows = []
    for r in records:
        scores = r.get("scores") or {}
        genome = r.get("genome") or []
        values = [float(v) for v in genome] if len(genome) == len(genes) else [None] * len(genes)
        worker = r.get("worker")
        rows.append([r["generation"], r["index"], r.get("fitness"),
                     *[_number(scores.get(t)) for t in tasks], *values,
                     _number(r.get("seconds")), None if worker is None else str(worker),
                     r.get("error")])
    return rows


def artifact_name(run_id: str) -> str:
    """One artifact per run (W&B artifact names are per project; a sweep has many runs), with a
    new version each time the best config improves."""
    return f"best_config-{run_id}"


def best_metadata(best: dict) -> dict:
    """What the best-config artifact records about the candidate it holds."""
    return {"fitness": best["fitness"], "generation": best["generation"],
            "index": best["index"], "scores": dict(best.get("scores") or {})}


def final_summary(best: Optional[dict], outcome: str, fevals: int) -> dict:
    """The run summary at the end; `fitness/best_so_far` is the sweep's metric."""
    out: dict[str, Any] = {"outcome": outcome, "evaluations": fevals}
    if best is not None:
        out.update({SWEEP_METRIC: best["fitness"], "best/generation": best["generation"],
                    "best/index": best["index"]})
        out.update({f"best/{t}": v for t, v in (best.get("scores") or {}).items()})
    return out


def init_kwargs(storage: Path, project: str, entity: Optional[str], run_id: str, config: dict,
                resume: bool, env: Mapping[str, str] = os.environ) -> dict:
    """The arguments of wandb.init. Under a sweep agent (WANDB_SWEEP_ID set) the agent has chosen
    the run (WANDB_RUN_ID), project and entity: wandb.init joins that run, and forcing our own id
    or project would detach it from the sweep."""
    kw: dict[str, Any] = {"dir": str(storage), "config": config, "job_type": "evolve"}
    if env.get("WANDB_SWEEP_ID"):
        return kw
    kw.update(project=project, entity=entity, id=run_id, resume="allow" if resume else None,
              name=Path(storage).resolve().name)
    return kw


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# --- the run ------------------------------------------------------------------------------------
class Tracker:
    def __init__(self, storage: Path, project: str, entity: Optional[str], run_id: str,
                 config: dict, resume: bool, genes: Optional[list[str]] = None,
                 tasks: Optional[list[str]] = None):
        import wandb

        if "WANDB_MODE" not in os.environ and not has_credentials():
            os.environ["WANDB_MODE"] = "offline"
        self.mode = os.environ.get("WANDB_MODE", "online")
        self.wandb = wandb
        self.run = wandb.init(**init_kwargs(storage, project, entity, run_id, config, resume),
                              settings=wandb.Settings(silent=True, console="off"))
        self.run.define_metric(STEP_METRIC)
        for name in PER_GENERATION:
            self.run.define_metric(name, step_metric=STEP_METRIC)
        self.genes = list(genes or [])
        self.tasks = list(tasks or [])
        self.logged_best: Optional[float] = None   # fitness of the last best-config version

    def _table(self, records: list[dict]):
        tasks = task_names(records, self.tasks)
        return self.wandb.Table(columns=candidate_columns(self.genes, tasks),
                                data=candidate_rows(records, self.genes, tasks))

    def log_generation(self, stats: dict, records: list[dict], best: Optional[dict],
                       best_config: Optional[Path] = None) -> None:
        """The generation's metrics and candidates table; a new version of the best-config
        artifact when this generation improved on the best."""
        payload = generation_metrics(stats, best)
        if records:
            payload[CANDIDATES_TABLE] = self._table(records)
        self.run.log(payload)
        if best is not None and (self.logged_best is None or best["fitness"] > self.logged_best):
            self.log_best(best, best_config, aliases=[f"generation-{stats['generation']}"])

    def log_best(self, best: dict, best_config: Optional[Path], aliases: list[str]) -> None:
        if best_config is None or not Path(best_config).is_file():
            return
        art = self.wandb.Artifact(artifact_name(self.run.id), type=ARTIFACT_TYPE,
                                  metadata=best_metadata(best))
        art.add_file(str(best_config), name="best_config.yaml")
        # identical content is stored once: W&B only adds the aliases to the existing version
        self.run.log_artifact(art, aliases=["latest", *aliases])
        self.logged_best = best["fitness"]

    def finish(self, history: list[dict], best_config: Optional[Path], outcome: str,
               best: Optional[dict] = None, report_png: Optional[Path] = None) -> None:
        payload: dict[str, Any] = {EVALUATIONS_TABLE: self._table(history)}
        if report_png is not None and Path(report_png).is_file():
            payload["report"] = self.wandb.Image(str(report_png))
        self.run.log(payload)
        for key, value in final_summary(best, outcome, len(history)).items():
            self.run.summary[key] = value
        if best is not None:
            self.log_best(best, best_config, aliases=["final"])
        self.run.finish()
        # run.finish() returns before wandb's service process has written the last records;
        # teardown waits for it, so the offline run is complete when mergekit-evolve exits.
        self.wandb.teardown()
