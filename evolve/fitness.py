"""Scoring a live model with lm-eval: tasks built once, evaluated per candidate.

`simple_evaluate` rebuilds every task on each call (seconds); building the task objects once per
worker and calling `lm_eval.evaluator.evaluate` per candidate costs only the model's forward passes.
The response cache stays off: it is keyed by model name, and our weights change under one name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from merge.errors import EvomergeError


@dataclass
class EvalSettings:
    """What every worker needs to score candidates (plain data: it travels to Ray actors)."""

    task_names: list[str]
    metrics: dict[str, str]                 # task -> result key such as "acc,none"
    include_dir: Optional[str]              # the mirrored task folders (see evolve.tasks)
    limit: Any = None
    num_fewshot: Optional[int] = None
    shuffle: bool = False
    seed: int = 1234
    batch_size: Any = 16
    device: str = "cpu"
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    extra: dict = field(default_factory=dict)


def weighted_fitness(scores: dict[str, float], weights: dict[str, float]) -> float:
    """fitness = Σ weight · score over the genome's tasks (a negative weight minimises a task)."""
    return float(sum(weights[name] * scores[name] for name in weights))


def extract_score(results: dict, task: str, metric: str) -> float:
    """One task's metric from lm-eval's results (tasks and aggregated groups alike)."""
    for section in ("results", "groups"):
        entry = (results.get(section) or {}).get(task)
        if entry and metric in entry:
            value = entry[metric]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise EvomergeError(f"task '{task}' reported {metric}={value!r}, not a number")
            value = float(value)
            if math.isnan(value):
                raise EvomergeError(f"task '{task}' scored NaN for {metric}")
            return value
    entry = (results.get("results") or {}).get(task) or {}
    available = sorted(k for k in entry if "," in k and "stderr" not in k)
    raise EvomergeError(f"task '{task}' reported no '{metric}' (it reports "
                        f"{', '.join(available) or 'nothing'}); fix tasks[].metric in the genome")


class TaskScorer:
    """Holds an lm-eval model wrapper and the task objects of one worker; `score()` evaluates
    whatever weights the wrapped model holds right now. Backends differ only in the wrapper."""

    def __init__(self, lm, settings: EvalSettings):
        from evolve import tasks as task_lib

        self.settings = settings
        self.lm = lm
        tm = task_lib.task_manager(settings.include_dir, settings.task_names)
        self.task_dict = task_lib.load_tasks(tm, settings.task_names, settings.num_fewshot,
                                             settings.seed)
        self.samples = (task_lib.sample_indices(self.task_dict, settings.limit, settings.seed)
                        if settings.shuffle else None)

    def score(self, samples: Optional[dict] = None) -> dict[str, float]:
        """The configured metric per task; on `samples` ({task: [item index, ...]}, e.g. a
        multi-fidelity subset, see evolve.fidelity) when given, else on the settings' items."""
        import lm_eval.evaluator

        s = self.settings
        samples = samples if samples is not None else self.samples
        results = lm_eval.evaluator.evaluate(
            lm=self.lm, task_dict=self.task_dict,
            limit=None if samples is not None else s.limit, samples=samples,
            bootstrap_iters=0,            # stderr bootstraps cost seconds and are not used
            log_samples=False, verbosity="ERROR",
            apply_chat_template=s.apply_chat_template,
            fewshot_as_multiturn=s.fewshot_as_multiturn)
        return {name: extract_score(results, name, s.metrics[name]) for name in s.task_names}


class Scorer(TaskScorer):
    """The Hugging Face backend: lm-eval's HFLM around a live transformers model."""

    def __init__(self, model, tokenizer, settings: EvalSettings):
        from lm_eval.models.huggingface import HFLM

        super().__init__(HFLM(pretrained=model, tokenizer=tokenizer,
                              batch_size=settings.batch_size, device=settings.device), settings)
