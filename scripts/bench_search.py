#!/usr/bin/env python
"""What multi-fidelity fitness buys, and what CMA-ES buys, on the demo's search.

For each seed, on the demo family (scripts/make_demo_family.py) and the demo genome
(configs/demo/genome.yml: task arithmetic, 6 weight genes, fitness = mean exact match over three
skills on the *fit* split, 60 items each):

  full    mergekit-evolve --fidelity full: every candidate on all 180 items
  multi   mergekit-evolve --fidelity multi: each generation on 8 items per task first, the best
          candidate of each generation on the other 52
  random  random search (uniform in the genome's ranges), every candidate on all items, as many
          candidates as the multi run's item budget pays for
  grid    uniform task arithmetic (every weight equal) on an even grid over the weight range, the
          same budget

and for each the best candidate (by its fit score) is judged on the held-out split (100 items
per skill, never seen by any search). Items scored count every item of every task scored for
every candidate. Random and grid run in this process (no Ray start-up), so their wall time is not
comparable with the searches'.

    python scripts/bench_search.py [--seeds 0 1 2] [--max-fevals 64] [--workers 2]

Results: printed, and written to .cache/bench_search/results.json. Heavy on 2 cores (~15 min).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
WORK = ROOT / ".cache" / "bench_search"
SKILLS = ("cipher", "reverse", "double")


def search(mode: str, seed: int, genome: Path, args) -> dict:
    popsize, fevals = ((args.multi_popsize or args.popsize, args.multi_fevals or args.max_fevals)
                       if mode == "multi" else (args.popsize, args.max_fevals))
    storage = WORK / f"{mode}-p{popsize}-n{fevals}-seed{seed}"
    if storage.exists():
        import shutil

        shutil.rmtree(storage)
    cmd = [sys.executable, "-m", "evolve", str(genome), "--storage-path", str(storage),
           "--workers", str(args.workers), "--max-fevals", str(fevals), "--popsize",
           str(popsize), "--seed", str(seed), "--batch-size", "64", "--fidelity", mode,
           "--no-wandb", "--no-merge-best", "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode} seed {seed} failed:\n{r.stderr[-3000:]}")
    history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    items = sum(scored_items(rec, history) for rec in history)
    best = yaml.safe_load((storage / "best_config.yaml").read_text())
    fit = max(rec["fitness"] for rec in history if rec.get("fitness") is not None
              and rec.get("full", True))
    return {"items": items, "wall": wall, "config": best, "fit": fit,
            "candidates": sum(1 for rec in history if rec.get("rung", 0) == 0)}


def scored_items(rec: dict, history: list[dict]) -> int:
    """Items this evaluation scored (a rung-1 record reuses its candidate's rung-0 items)."""
    items = rec["items"]
    if "scored" in items:
        return items["scored"]
    if items.get("rung") == 1:   # histories written before `scored` existed
        low = next(r for r in history if r["generation"] == rec["generation"]
                   and r["index"] == rec["index"] and r.get("rung") == 0)
        return items["count"] - low["items"]["count"]
    return items["count"]


class Judge:
    """Scores configs in this process: fit split (what a search sees) and held-out split."""

    def __init__(self, family: dict[str, Path]):
        import torch
        from transformers import AutoTokenizer

        from evolve.fitness import EvalSettings, Scorer
        from evolve.tasks import default_search_paths, mirror_search_paths
        from merge.config import MergeConfig
        from merge.engine import InMemoryMerger

        torch.set_num_threads(1)
        include = mirror_search_paths(default_search_paths(), WORK / ".tasks")
        self.tok = AutoTokenizer.from_pretrained(family["base"])
        self.merger = InMemoryMerger()
        self.MergeConfig = MergeConfig
        start = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
                 "models": [{"model": str(family[s]), "parameters": {"weight": 0.5}}
                            for s in SKILLS]}
        self.model = self.merger.build_model(MergeConfig.from_dict(start))
        self.scorers = {}
        for split in ("fit", "heldout"):
            names = [f"demo_{s}_{split}" for s in SKILLS]
            settings = EvalSettings(task_names=names, metrics={n: "acc,none" for n in names},
                                    include_dir=str(include), batch_size=64)
            self.scorers[split] = Scorer(self.model, self.tok, settings)

    def score(self, config: dict, split: str) -> float:
        self.merger.merge_into(self.MergeConfig.from_dict(config), self.model)
        scores = self.scorers[split].score()
        return sum(scores.values()) / len(scores)


def baseline(kind: str, seed: int, n: int, space, judge: Judge, items_per: int) -> dict:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    best = None
    for k in range(n):
        if kind == "random":
            x = [rng.uniform(lo, hi) for lo, hi in zip(space.lower, space.upper)]
        else:   # every weight equal, an even grid over the range (endpoints excluded)
            lo, hi = space.lower[0], space.upper[0]
            x = [lo + (hi - lo) * (k + 1) / (n + 1)] * space.dim
        config = space.decode(x)
        fit = judge.score(config, "fit")
        if best is None or fit > best[0]:
            best = (fit, config)
    return {"items": n * items_per, "wall": time.perf_counter() - t0, "config": best[1],
            "fit": best[0], "candidates": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-fevals", type=int, default=64)
    p.add_argument("--popsize", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--family-seed", type=int, default=0)
    p.add_argument("--modes", default="full,multi,random,grid",
                   help="which rows (random and grid take their budget from multi's)")
    p.add_argument("--multi-popsize", type=int, default=None,
                   help="popsize of the multi-fidelity runs [default: --popsize]")
    p.add_argument("--multi-fevals", type=int, default=None,
                   help="candidates of the multi-fidelity runs [default: --max-fevals]")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)

    from demo import genome_for
    from make_demo_family import build_family

    from evolve.genome import GenomeSpace, parse_evolve_config

    family = build_family(WORK / "family", seed=args.family_seed)
    genome = genome_for(family, ROOT / "configs/demo/genome.yml")
    genome_path = WORK / "genome.yml"
    genome_path.write_text(yaml.safe_dump(genome, sort_keys=False))
    space = GenomeSpace.build(parse_evolve_config(genome).genome)
    judge = Judge(family)
    items_per = 3 * 60

    modes = args.modes.split(",")
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for seed in args.seeds:
        for mode in [m for m in ("full", "multi") if m in modes]:
            r = search(mode, seed, genome_path, args)
            r["heldout"] = judge.score(r["config"], "heldout")
            rows[mode].append(r)
            print(f"seed {seed} {mode:6s} items {r['items']:6d}  wall {r['wall']:6.1f}s  "
                  f"fit {r['fit']:.3f}  held-out {r['heldout']:.3f}", flush=True)
        budget = rows["multi"][-1]["items"] if "multi" in rows else args.max_fevals * items_per // 4
        n = max(1, budget // items_per)
        for kind in [m for m in ("random", "grid") if m in modes]:
            if kind == "grid" and rows["grid"]:
                rows["grid"].append(rows["grid"][0])   # deterministic: the same for every seed
                continue
            r = baseline(kind, seed, n, space, judge, items_per)
            r["heldout"] = judge.score(r["config"], "heldout")
            rows[kind].append(r)
            print(f"seed {seed} {kind:6s} items {r['items']:6d}  wall {r['wall']:6.1f}s  "
                  f"fit {r['fit']:.3f}  held-out {r['heldout']:.3f}", flush=True)

    load = os.getloadavg()
    lines = [f"| method | items scored (mean) | vs full | wall s (mean) | held-out best, per seed "
             f"| held-out mean ± sd |", "|---|---|---|---|---|---|"]
    full_items = (statistics.mean(r["items"] for r in rows["full"]) if "full" in rows
                  else args.max_fevals * items_per)
    for mode, rs in rows.items():
        h = [r["heldout"] for r in rs]
        sd = statistics.stdev(h) if len(h) > 1 else 0.0
        items = statistics.mean(r["items"] for r in rs)
        lines.append(f"| {mode} | {items:.0f} | {items / full_items:.2f} | "
                     f"{statistics.mean(r['wall'] for r in rs):.0f} | "
                     f"{', '.join(f'{x:.3f}' for x in h)} | {statistics.mean(h):.3f} ± {sd:.3f} |")
    table = "\n".join(lines)
    print(f"\n{table}\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; seeds {args.seeds}, "
          f"{args.max_fevals} candidates per search, popsize {args.popsize}; multi: popsize "
          f"{args.multi_popsize or args.popsize}, {args.multi_fevals or args.max_fevals} candidates")
    (WORK / f"results-{'-'.join(modes)}.json").write_text(json.dumps(
        {"rows": {m: [{k: v for k, v in r.items() if k != "config"} for r in rs]
                  for m, rs in rows.items()}, "load": load, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
