#!/usr/bin/env python
"""The main job on embedded defaults: evolve a merge of a demo model family and judge it.

1. build (or reuse) the demo family: a tiny char-level Llama base and three skill specialists;
2. run `mergekit-evolve` on it: CMA-ES, local Ray workers, lm-eval (HF backend), W&B offline;
3. score on the held-out split: the base, each parent, a uniform merge, and the evolved merge.

Everything stays under --out (default demo_out/); run again and the family and a finished search
are reused (an interrupted search resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

SKILLS = ("cipher", "reverse", "double")
UNIFORM_WEIGHT = 0.6  # uniform task arithmetic: every specialist's task vector at the same weight


def genome_for(family: dict[str, Path], template: Path) -> dict:
    genome = yaml.safe_load(template.read_text())
    genome["genome"]["models"] = [str(family[s]) for s in SKILLS]
    genome["genome"]["base_model"] = str(family["base"])
    return genome


def run_search(genome_path: Path, storage: Path, args) -> None:
    cmd = [str(Path(sys.executable).parent / "mergekit-evolve"), str(genome_path), "--storage-path", str(storage),
           "--workers", str(args.workers), "--max-fevals", str(args.max_fevals),
           "--seed", str(args.seed), "--batch-size", "64", "--wandb"]
    if args.popsize:
        cmd += ["--popsize", str(args.popsize)]
    if (storage / "history.jsonl").exists():
        cmd.append("--resume")
    print("$ " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.returncode)


def heldout_scores(model, tokenizer, include_dir: Path, limit=None) -> dict[str, float]:
    from evolve.fitness import EvalSettings, Scorer

    names = [f"demo_{s}_heldout" for s in SKILLS]
    settings = EvalSettings(task_names=names, metrics={n: "acc,none" for n in names},
                            include_dir=str(include_dir), limit=limit, batch_size=64)
    scores = Scorer(model, tokenizer, settings).score()
    out = {s: scores[f"demo_{s}_heldout"] for s in SKILLS}
    out["mean"] = sum(out.values()) / len(SKILLS)
    return out


def reference_rows(family: dict[str, Path], members, score) -> list[tuple[str, dict]]:
    """(label, score(model)) for the base, each parent in `members` and their uniform
    task-arithmetic merge: what an evolved model is judged against."""
    from transformers import AutoModelForCausalLM

    from merge.config import MergeConfig
    from merge.engine import InMemoryMerger

    rows = [(label, score(AutoModelForCausalLM.from_pretrained(path).eval()))
            for label, path in [("base", family["base"])]
            + [(f"parent: {m}", family[m]) for m in members]]
    uniform = MergeConfig.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(family["base"]),
        "models": [{"model": str(family[m]), "parameters": {"weight": UNIFORM_WEIGHT}}
                   for m in members]})
    rows.append((f"uniform task arithmetic ({UNIFORM_WEIGHT})",
                 score(InMemoryMerger().build_model(uniform))))
    return rows


def judge(family: dict[str, Path], storage: Path, out: Path) -> list[tuple[str, dict]]:
    import torch
    from transformers import AutoTokenizer

    from evolve.tasks import default_search_paths, mirror_search_paths
    from merge.config import MergeConfig
    from merge.engine import InMemoryMerger

    torch.set_num_threads(2)
    include = mirror_search_paths(default_search_paths(), out / ".tasks")
    tok = AutoTokenizer.from_pretrained(family["base"])
    rows = reference_rows(family, SKILLS, lambda model: heldout_scores(model, tok, include))
    best = MergeConfig.from_dict(yaml.safe_load((storage / "best_config.yaml").read_text()))
    rows.append(("evolved (best_config.yaml)",
                 heldout_scores(InMemoryMerger().build_model(best), tok, include)))
    return rows


def print_table(rows: list[tuple[str, dict]]) -> str:
    head = f"{'model':34s}" + "".join(f"{s:>9s}" for s in SKILLS) + f"{'mean':>9s}"
    lines = [head, "-" * len(head)]
    for label, sc in rows:
        lines.append(f"{label:34s}" + "".join(f"{sc[s]:9.3f}" for s in SKILLS) + f"{sc['mean']:9.3f}")
    table = "\n".join(lines)
    print(table)
    return table


# --- the data-flow demo (--dataflow) -------------------------------------------------------------
# Its own family (scripts/make_stage_family.py): a base that copies, and two specialists whose
# middle layer maps every letter (cipher: shift by one; atbash: a<->z). The task is the composition,
# cipher then atbash ("map: abc =" -> " yxw"), which no member was trained for.
COMPOSITION = "cipatb"
COMPOSED = ("cipher", "atbash")             # the specialists whose skills it composes
FIT = f"demo_{COMPOSITION}_fit"
HELDOUT = f"demo_{COMPOSITION}_heldout"
# Fitness: the mean log-likelihood of the whole answer (the task's `perplexity` metric with mean
# aggregation). Exact match starts at 0 for every parent, which gives a search nothing to climb.
FIT_TASKS = [{"name": FIT, "metric": "perplexity,none", "weight": 1.0}]


def dataflow_genomes(family: dict[str, Path], ps_model: Optional[Path]) -> dict[str, dict]:
    models = [str(family[s]) for s in COMPOSED]
    out = {
        "ps": {"genome": {"models": models, "merge_method": "task_arithmetic",
                          "base_model": str(family["base"]), "layer_granularity": 2,
                          "parameters": {"weight": [0.0, 1.5]}}},
        "dfs": {"genome": {"models": models, "merge_method": "passthrough",
                           "layer_stacking": {"repeats": 3, "min_layers": 2, "max_layers": 12,
                                              "scales": "models"}}},
    }
    if ps_model is not None:
        out["psdfs"] = {"genome": {"models": [str(ps_model), *models],
                                   "merge_method": "passthrough",
                                   "layer_stacking": {"repeats": 3, "min_layers": 2,
                                                      "max_layers": 12, "scales": "models"}}}
    for g in out.values():
        # float32 throughout: the PS result then has the specialists' dtype, so every PS+DFS
        # candidate is one dtype and equals its checkpoint bit for bit
        g["genome"]["dtype"] = "float32"
        g["tasks"] = FIT_TASKS
    return out


def search(genome: dict, storage: Path, seed: int, args) -> None:
    storage.parent.mkdir(parents=True, exist_ok=True)
    path = storage.parent / f"{storage.name}.yml"
    path.write_text(yaml.safe_dump(genome, sort_keys=False))
    cmd = [str(Path(sys.executable).parent / "mergekit-evolve"), str(path), "--storage-path",
           str(storage), "--workers", str(args.workers), "--max-fevals", str(args.max_fevals),
           "--seed", str(seed), "--batch-size", "64", "--popsize", str(args.popsize)]
    if (storage / "best_model" / "config.json").exists():
        print(f"  reusing {storage}", flush=True)
        return
    if (storage / "history.jsonl").exists():
        cmd.append("--resume")
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(1)


def composition_scores(model, tokenizer, include_dir: Path) -> dict[str, float]:
    from evolve.fitness import EvalSettings, Scorer

    settings = EvalSettings(task_names=[HELDOUT], metrics={HELDOUT: "acc,none"},
                            include_dir=str(include_dir), batch_size=64)
    scorer = Scorer(model, tokenizer, settings)
    acc = scorer.score()[HELDOUT]
    scorer.settings = EvalSettings(task_names=[HELDOUT], metrics={HELDOUT: "perplexity,none"},
                                   include_dir=str(include_dir), batch_size=64)
    return {"acc": acc, "ll": scorer.score()[HELDOUT]}


def dataflow_demo(args, family: dict[str, Path], out: Path, t0: float) -> int:
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolve.path_model import PathModels
    from evolve.tasks import default_search_paths, mirror_search_paths
    from merge.config import MergeConfig

    root = out / "dataflow"
    seeds = list(range(args.seeds))
    t_family = time.time() - t0
    print(f"[2/3] searches on '{COMPOSITION}' (cipher, then atbash), seeds {seeds}: PS, DFS, "
          f"PS+DFS", flush=True)
    for seed in seeds:
        ps = root / f"ps-seed{seed}"
        search(dataflow_genomes(family, None)["ps"], ps, seed, args)
        genomes = dataflow_genomes(family, ps / "best_model")
        search(genomes["dfs"], root / f"dfs-seed{seed}", seed, args)
        search(genomes["psdfs"], root / f"psdfs-seed{seed}", seed, args)
    t_search = time.time() - t0 - t_family

    print("[3/3] held-out evaluation of the composition (items the searches never saw)",
          flush=True)
    torch.set_num_threads(2)
    include = mirror_search_paths(default_search_paths(), out / ".tasks")
    tok = AutoTokenizer.from_pretrained(family["base"])
    rows = reference_rows(family, COMPOSED, lambda model: composition_scores(model, tok, include))
    checks = []
    for kind, label in (("ps", "PS"), ("dfs", "DFS"), ("psdfs", "PS+DFS")):
        for seed in seeds:
            storage = root / f"{kind}-seed{seed}"
            stock = AutoModelForCausalLM.from_pretrained(storage / "best_model").eval()
            sc = composition_scores(stock, tok, include)
            rows.append((f"{label}, seed {seed}", sc))
            if kind != "ps":   # the search's own in-memory path model scores the same
                cfg = MergeConfig.from_dict(yaml.safe_load(
                    (storage / "best_config.yaml").read_text()))
                live = PathModels.for_config(cfg).build(cfg)
                checks.append((f"{label}, seed {seed}", sc, composition_scores(live, tok, include),
                               stock.config.num_hidden_layers))
    lines = [f"{'model':34s}{'exact match':>12s}{'mean loglik':>13s}", "-" * 59]
    lines += [f"{label:34s}{sc['acc']:12.3f}{sc['ll']:13.3f}" for label, sc in rows]
    table = "\n".join(lines)
    print(table)
    (root / "heldout.md").write_text(table + "\n")
    (root / "heldout.json").write_text(json.dumps(dict(rows), indent=2))

    def best_of(prefix):
        return [sc["acc"] for label, sc in rows if label.startswith(prefix + ",")]

    parents = max(sc["acc"] for label, sc in rows if label.startswith("parent"))
    summary = {k: best_of(k) for k in ("PS", "DFS", "PS+DFS")}
    for k, v in summary.items():
        spread = max(v) - min(v)
        print(f"{k:7s} held-out exact match: mean {statistics.mean(v):.3f}, best {max(v):.3f}, "
              f"seed spread {spread:.3f}")
    evolved = max(max(v) for v in summary.values())
    print(f"best evolved {evolved:.3f} vs best parent {parents:.3f} "
          f"({100 * (evolved - parents):+.1f} points)")
    for label, stock, live, depth in checks:
        same = "same" if stock == live else "DIFFERENT"
        print(f"{label}: from_pretrained {stock['acc']:.3f}/{stock['ll']:.4f}, in-search path "
              f"model {live['acc']:.3f}/{live['ll']:.4f} ({same}; {depth} layers)")
    print(f"family {t_family:.0f} s, searches {t_search:.0f} s, all {time.time() - t0:.0f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "demo_out")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--family-seed", type=int, default=0)
    p.add_argument("--max-fevals", type=int, help="evaluations per search (64; --dataflow: 160)")
    p.add_argument("--popsize", type=int, help="candidates per generation (8; --dataflow: 16)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a small family and budget (CI-sized)")
    p.add_argument("--dataflow", action="store_true",
                   help="the data-flow demo: PS, DFS and PS+DFS on a compositional task")
    p.add_argument("--seeds", type=int, default=3, help="--dataflow: search seeds 0..N-1")
    args = p.parse_args(argv)
    if args.max_fevals is None:
        args.max_fevals = 160 if args.dataflow else 64
    if args.popsize is None:
        args.popsize = 16 if args.dataflow else 8
    os.environ.setdefault("WANDB_MODE", "offline")
    t0 = time.time()

    out = args.out.resolve()
    if args.dataflow:
        from make_stage_family import build_stage_family

        print(f"[1/3] staged demo family in {out / 'stage_family'} (built once, then reused)",
              flush=True)
        family = build_stage_family(out / "stage_family", seed=args.family_seed)
        return dataflow_demo(args, family, out, t0)

    from make_demo_family import build_family

    print(f"[1/3] demo family in {out / 'family'} (built once, then reused)", flush=True)
    family = build_family(out / "family", seed=args.family_seed, quick=args.quick)
    print("[2/3] evolutionary search (CMA-ES, local Ray, lm-eval HF backend, W&B offline)",
          flush=True)
    storage = out / f"evolve-seed{args.seed}"
    genome_path = out / "genome.yml"
    genome_path.write_text(yaml.safe_dump(genome_for(family, ROOT / "configs/demo/genome.yml"),
                                          sort_keys=False))
    run_search(genome_path, storage, args)

    print("[3/3] held-out evaluation (items the search never saw)", flush=True)
    from evolve.console import route_third_party

    logs = route_third_party(out / "logs" / "demo.log")   # lm-eval's per-model warnings
    rows = judge(family, storage, out)
    table = print_table(rows)
    (out / "heldout.md").write_text(table + "\n")
    (storage / "heldout.json").write_text(json.dumps(dict(rows), indent=2))
    parents = max(sc["mean"] for label, sc in rows if label.startswith("parent"))
    evolved = rows[-1][1]["mean"]
    print(f"\nevolved {evolved:.3f} vs best parent {parents:.3f} ({100 * (evolved - parents):+.1f} "
          f"points) — {time.time() - t0:.0f} s in all")
    print(f"report: {storage / 'report.png'}  {storage / 'report.html'}")
    print(f"merged model: {storage / 'best_model'}   recipe: {storage / 'best_config.yaml'}")
    print(f"third-party messages: {logs}, {storage / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
