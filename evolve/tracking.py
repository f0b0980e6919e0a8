"""Weights & Biases logging: one run per search (the same run again on --resume).

Offline unless credentials are configured: without an API key we set WANDB_MODE=offline and the run
is written under <storage>/wandb/offline-run-*/ (upload later with `wandb sync`). An explicit
WANDB_MODE from the environment wins.
"""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Optional


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or str(Path.home() / ".netrc"))
    except (OSError, netrc.NetrcParseError):
        return False
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1]
    return rc.authenticators(host.rstrip("/")) is not None


def generation_metrics(stats: dict, best: Optional[dict]) -> dict:
    """The per-generation payload (kept separate so it can be tested without W&B)."""
    out = {"generation": stats["generation"], "fitness/best": stats["best"],
           "fitness/mean": stats["mean"], "fitness/worst": stats["worst"],
           "fitness/best_so_far": stats["best_so_far"], "cma/sigma": stats["sigma"],
           "evaluations": stats["fevals"], "failed": stats["failed"]}
    for task, score in ((best or {}).get("scores") or {}).items():
        out[f"best/{task}"] = score
    return out


class Tracker:
    def __init__(self, storage: Path, project: str, entity: Optional[str], run_id: str,
                 config: dict, resume: bool):
        import wandb

        if "WANDB_MODE" not in os.environ and not has_credentials():
            os.environ["WANDB_MODE"] = "offline"
        self.mode = os.environ.get("WANDB_MODE", "online")
        self.wandb = wandb
        self.run = wandb.init(project=project, entity=entity, id=run_id, dir=str(storage),
                              config=config, resume="allow" if resume else None,
                              name=Path(storage).resolve().name, job_type="evolve",
                              settings=wandb.Settings(silent=True, console="off"))
        self.rows: list[list] = []
        self.tasks: list[str] = []

    def log_generation(self, stats: dict, best: Optional[dict]) -> None:
        self.run.log(generation_metrics(stats, best), step=stats["generation"])

    def finish(self, history: list[dict], best_config: Optional[Path], outcome: str) -> None:
        wandb = self.wandb
        tasks = sorted({t for r in history for t in (r.get("scores") or {})})
        columns = ["generation", "index", "fitness", *tasks, "seconds", "worker", "error"]
        table = wandb.Table(columns=columns)
        for r in history:
            scores = r.get("scores") or {}
            table.add_data(r["generation"], r["index"], r.get("fitness"),
                           *[scores.get(t) for t in tasks], r.get("seconds"), r.get("worker"),
                           r.get("error"))
        self.run.log({"evaluations_table": table})
        self.run.summary["outcome"] = outcome
        if best_config is not None and best_config.is_file():
            art = wandb.Artifact("best_config", type="merge-config")
            art.add_file(str(best_config))
            self.run.log_artifact(art)
        self.run.finish()
