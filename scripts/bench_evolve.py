#!/usr/bin/env python
"""Per-candidate merge cost of mergekit-evolve: in memory (what a worker does) vs to disk.

On the 1.1B-parameter bf16 benchmark family (scripts/bench_family.py: base, child_a, child_b), for
each method a genome (2 layer blocks × filter groups self_attn / mlp / rest) is decoded at random
points, and each candidate config is merged

  * in memory: `InMemoryMerger.merge_into(config, model)` into one live model — inputs were loaded
    by the first candidate (reported separately as the one-time worker start-up), every later
    candidate only computes;
  * to disk: `mergekit-yaml CONFIG OUT` as a subprocess (what a file-based search pays per
    candidate, before loading the result back for evaluation) — and, for reference, the load of that
    output with `AutoModelForCausalLM.from_pretrained`.

The in-memory result is compared bit for bit with the to-disk output of the same config. The target
(issue 5): in-memory under one third of to-disk. Timings are wall-clock on a possibly shared machine
(the load average is recorded). Results are printed and written to .cache/bench_evolve.json.

Usage:
    python scripts/bench_evolve.py [--methods linear,ties,ties+cache] [--candidates 3] [--family DIR]
    python scripts/bench_evolve.py --memory 1,2,4     # workers' memory, private vs shared inputs

A `+cache` suffix keeps the task vectors' magnitude orders in the merger (2 bytes per parameter per
model; `mergekit-evolve --cache-magnitudes`): TIES thresholds become lookups.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))
WORK = REPO_ROOT / ".cache" / "bench_evolve"


def log(msg: str) -> None:
    print(msg, flush=True)


def genome_space(method: str, dirs: dict):
    from evolve.genome import GenomeSpace, parse_evolve_config

    genome = {"models": [str(dirs["child_a"]), str(dirs["child_b"])], "merge_method": method,
              "base_model": str(dirs["base"]), "layer_granularity": 11,
              "filters": ["self_attn", "mlp"]}
    return GenomeSpace.build(parse_evolve_config({"genome": genome,
                                                  "tasks": [{"name": "t"}]}).genome)


def to_disk(config: dict, tag: str, seed: int) -> dict:
    """mergekit-yaml in a subprocess, then (for reference) loading the output back."""
    import yaml

    cfg_path = WORK / f"{tag}.yml"
    out = WORK / f"out-{tag}"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    exe = Path(sys.executable).parent / "mergekit-yaml"
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), str(cfg_path), str(out), "--overwrite", "-q",
                           "--random-seed", str(seed)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"mergekit-yaml failed:\n{proc.stderr[-2000:]}")
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    load = time.perf_counter() - t0
    return {"mergekit_yaml_s": wall, "load_s": load, "out": out}


def same_as_disk(model, out: Path) -> bool:
    import torch
    from safetensors import safe_open

    live = model.state_dict()
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                if not torch.equal(live[name], st.get_tensor(name)):
                    log(f"  MISMATCH {name}")
                    return False
    return True


def bench_method(label: str, dirs: dict, candidates: int, seed: int) -> dict:
    """`label` is a method name, optionally with `+cache`: the in-memory merger then keeps the
    task vectors' magnitude orders (MergeOptions.cache_magnitudes, mergekit-evolve
    --cache-magnitudes)."""
    import torch

    from merge.config import MergeConfig
    from merge.engine import InMemoryMerger, MergeOptions

    method, _, flag = label.partition("+")
    cache = flag == "cache"
    space = genome_space(method, dirs)
    rng = random.Random(seed)
    points = [[rng.uniform(lo, hi) for lo, hi in zip(space.lower, space.upper)]
              for _ in range(candidates)]
    configs = [space.decode(x) for x in points]
    log(f"{label}: {space.dim} genes, {candidates} candidates")

    merger = InMemoryMerger(MergeOptions(random_seed=seed, quiet=True, cache_magnitudes=cache))
    t0 = time.perf_counter()
    model = merger.build_model(MergeConfig.from_dict(space.decode(space.initial_vector())))
    startup = time.perf_counter() - t0
    log(f"  worker start-up (load inputs, build + merge the first model): {startup:.1f} s")
    per_candidate = []
    for k, cfg in enumerate(configs):
        t0 = time.perf_counter()
        merger.merge_into(MergeConfig.from_dict(cfg), model)
        per_candidate.append(time.perf_counter() - t0)
        log(f"  in memory, candidate {k}: {per_candidate[-1]:.2f} s")
    disk = to_disk(configs[-1], label, seed)
    log(f"  to disk (mergekit-yaml): {disk['mergekit_yaml_s']:.2f} s, then loading it back "
        f"{disk['load_s']:.2f} s")
    identical = same_as_disk(model, disk["out"])
    shutil.rmtree(disk["out"], ignore_errors=True)
    in_mem = min(per_candidate)
    result = {"genes": space.dim, "startup_s": startup, "in_memory_s": per_candidate,
              "in_memory_best_s": in_mem, "mergekit_yaml_s": disk["mergekit_yaml_s"],
              "load_back_s": disk["load_s"], "bit_identical": identical,
              "ratio": in_mem / disk["mergekit_yaml_s"],
              "meets_target": in_mem < disk["mergekit_yaml_s"] / 3,
              "torch_threads": torch.get_num_threads(),
              "magnitude_cache_gb": merger.magnitude_cache_bytes / 1e9}
    if cache:
        log(f"  kept magnitude orders: {result['magnitude_cache_gb']:.2f} GB")
    del model, merger
    return result


# --- memory of N workers on one node (--memory) -----------------------------------------------
WORKER_SNIPPET = r"""
import sys, json, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from merge.config import MergeConfig
from merge.engine import InMemoryMerger, MergeOptions
config = MergeConfig.from_dict(json.loads(sys.argv[2]))
merger = InMemoryMerger(MergeOptions(quiet=True, random_seed=1))
if sys.argv[3] == "shared":
    from evolve.shared_inputs import share_inputs
    assert share_inputs(merger, config)
model = merger.build_model(config)        # inputs read and kept, one working model: a worker
merger.merge_into(config, model)          # and one more candidate through it
print("ready", flush=True)
time.sleep(3600)
"""


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_memory(dirs: dict, counts: list[int], headroom: float = 3e9) -> list[dict]:
    """N processes holding what an evaluation worker holds (inputs kept by an InMemoryMerger, one
    live model, a candidate merged), with private input copies (before) and shared views (after).
    Measured once all are ready: the sum of their PSS (shared pages split between the processes
    mapping them) and RSS, and how much MemAvailable dropped. A configuration that would leave
    less than `headroom` bytes available (by the estimate of the previous measurement) is skipped,
    since the machine is shared."""
    import psutil

    space = genome_space("task_arithmetic", dirs)
    config = space.decode(space.initial_vector())
    per_worker: dict[str, float] = {}
    out = []
    for mode in ("private", "shared"):
        for n in counts:
            estimate = (per_worker.get(mode, 0.0) * n if mode == "private" else
                        per_worker.get("inputs", 0.0) + per_worker.get("model", 0.0) * n)
            if estimate and estimate > _mem_available() - headroom:
                log(f"memory: {n} worker(s), {mode} inputs: skipped (needs ~{estimate / 1e9:.1f} "
                    f"GB, {_mem_available() / 1e9:.1f} GB available)")
                out.append({"workers": n, "mode": mode, "skipped": True,
                            "estimate_gb": estimate / 1e9})
                continue
            base = _mem_available()
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-c", WORKER_SNIPPET, str(REPO_ROOT),
                                       json.dumps(config), mode], stdout=subprocess.PIPE,
                                      text=True) for _ in range(n)]
            try:
                for p in procs:
                    if p.stdout.readline().strip() != "ready":
                        raise SystemExit(f"a {mode} worker failed (exit {p.wait()})")
                ready = time.perf_counter() - t0
                infos = [psutil.Process(p.pid).memory_full_info() for p in procs]
                used = base - _mem_available()
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            row = {"workers": n, "mode": mode, "pss_gb": sum(i.pss for i in infos) / 1e9,
                   "rss_gb": sum(i.rss for i in infos) / 1e9,
                   "uss_gb": sum(i.uss for i in infos) / 1e9, "node_gb": used / 1e9,
                   "ready_s": ready, "load": os.getloadavg()[0]}
            out.append(row)
            log(f"memory: {n} worker(s), {mode:7s} inputs: PSS {row['pss_gb']:.2f} GB, RSS "
                f"{row['rss_gb']:.2f} GB, private (USS) {row['uss_gb']:.2f} GB, node "
                f"MemAvailable -{row['node_gb']:.2f} GB; ready in {ready:.0f}s "
                f"(load {row['load']:.1f})")
            if mode == "private":
                per_worker["private"] = max(per_worker.get("private", 0.0), row["pss_gb"] * 1e9 / n)
            else:
                per_worker["model"] = row["uss_gb"] * 1e9 / n
                per_worker["inputs"] = max(0.0, row["pss_gb"] - row["uss_gb"]) * 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default=None, metavar="N,N,...",
                    help="instead: peak memory of N workers, private vs shared inputs (1,2,4)")
    ap.add_argument("--methods", default="linear,ties,ties+cache")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--family", type=Path, default=None,
                    help="bench family folder (default: scripts/bench_family.py's cache)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import bench_family

    dirs = bench_family.build_family(args.family or bench_family.DEFAULT_DIR, log=log)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.memory:
        rows = bench_memory(dirs, [int(n) for n in args.memory.split(",")])
        (REPO_ROOT / ".cache" / "bench_memory.json").write_text(json.dumps(rows, indent=2))
        log("written to .cache/bench_memory.json")
        return
    results = {}
    for method in args.methods.split(","):
        results[method] = bench_method(method.strip(), dirs, args.candidates, args.seed)
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "loadavg_at_end": os.getloadavg(), "family": str(args.family or
                                                               bench_family.DEFAULT_DIR),
              "methods": results}
    (REPO_ROOT / ".cache" / "bench_evolve.json").write_text(json.dumps(report, indent=2) + "\n")
    log("\nmethod       in-memory/candidate  mergekit-yaml  (+load back)  ratio   target<1/3  "
        "identical")
    for m, r in results.items():
        log(f"{m:<12} {r['in_memory_best_s']:>10.2f} s        {r['mergekit_yaml_s']:>7.2f} s    "
            f"{r['load_back_s']:>6.2f} s      {r['ratio']:.2f}    "
            f"{'yes' if r['meets_target'] else 'NO':<10}  {r['bit_identical']}")
    log(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
        f"written to .cache/bench_evolve.json)")


if __name__ == "__main__":
    main()
