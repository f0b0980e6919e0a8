#!/usr/bin/env python
"""Score the demo family and simple merges of it with the demo lm-eval tasks.

    python scripts/demo_baselines.py --family DIR [--lambdas 0.6 1.0] [--build]

Rows: the base, each specialist, uniform task arithmetic (base + λ·Σ(θᵢ − base)) for each λ, and the
plain average of the specialists, all computed here directly in torch (independent of merge/), so
the numbers are a reference for what the merge engine and the search should reproduce or beat.
Columns: per-skill exact-match accuracy on the held-out split and the mean, then the fitness mean.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_family as demo  # noqa: E402

SPLITS = ("heldout", "fit")


def merges(states: dict[str, dict], lambdas: list[float]) -> dict[str, dict]:
    base = states["base"]
    taus = [{k: states[s][k] - base[k] for k in base} for s in demo.SKILLS]
    out = {f"task_arith λ={lam:g}": {k: base[k] + lam * sum(t[k] for t in taus) for k in base}
           for lam in lambdas}
    out["average"] = {k: sum(states[s][k] for s in demo.SKILLS) / len(demo.SKILLS) for k in base}
    return out


def evaluate_rows(family: dict[str, Path], lambdas: list[float], limit: int | None = None,
                  batch_size: int = 64) -> dict[str, dict[str, float]]:
    """{row name: {task name: acc}} for the parents, the base and the merges."""
    import lm_eval.evaluator
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = [f"demo_{s}_{split}" for split in SPLITS for s in demo.SKILLS]
    tm = lm_eval.tasks.TaskManager(include_path=str(demo.DEFAULT_TASKS_DIR))
    task_dict = lm_eval.tasks.get_task_dict(names, tm)  # built once: it dominates the cost otherwise

    model = AutoModelForCausalLM.from_pretrained(family["base"]).eval()
    tok = AutoTokenizer.from_pretrained(family["base"])
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")

    states = {name: AutoModelForCausalLM.from_pretrained(p).state_dict() for name, p in family.items()}
    candidates = {name: states[name] for name in ["base", *demo.SKILLS]}
    candidates.update(merges(states, lambdas))

    rows = {}
    for name, state in candidates.items():
        model.load_state_dict(state)  # in place: HFLM sees the new weights, nothing to rebuild
        res = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit, verbosity="ERROR")
        rows[name] = {t: res["results"][t]["acc,none"] for t in names}
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    head = f"{'model':20s} " + " ".join(f"{s:>8s}" for s in demo.SKILLS) + "  heldout      fit"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        ho = [r[f"demo_{s}_heldout"] for s in demo.SKILLS]
        fit = [r[f"demo_{s}_fit"] for s in demo.SKILLS]
        lines.append(f"{name:20s} " + " ".join(f"{x:8.2f}" for x in ho)
                     + f"  {sum(ho) / len(ho):7.3f}  {sum(fit) / len(fit):7.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, required=True, help="folder written by make_demo_family.py")
    ap.add_argument("--build", action="store_true", help="build (or reuse) the family first")
    ap.add_argument("--seed", type=int, default=0, help="with --build")
    ap.add_argument("--quick", action="store_true", help="with --build: the quick family")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.6, 1.0])
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    if args.build:
        family = demo.build_family(args.family, seed=args.seed, quick=args.quick)
    else:
        family = {m: args.family / m for m in ["base", *demo.SKILLS]}
        missing = [str(p) for p in family.values() if not (p / "config.json").is_file()]
        if missing:
            sys.exit(f"not a demo family (missing {', '.join(missing)}); build it with --build")
    t0 = time.time()
    rows = evaluate_rows(family, args.lambdas, limit=args.limit)
    print(format_table(rows))
    print(f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
