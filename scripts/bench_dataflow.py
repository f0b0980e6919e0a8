#!/usr/bin/env python
"""Per-candidate cost of data-flow (layer path) candidates on the 1.1B benchmark family.

A worker loads child_a and child_b once (bf16, 2.2 GB each); every candidate is then assembled
from their layer modules (evolve/path_model.py): shared tensors, plus the residual-branch outputs
that carry a folded hop scale. This prints, per random candidate of the genome
`{repeats: 3, max_layers: 44, scales: pairs}` (near the start point, as in a first generation, or
uniform over the space with `--points uniform`): its depth, the build time, the new bytes, and one
forward pass of 32 tokens for scale; then mergekit-yaml of the same config to disk, load time
back, and whether the in-memory logits equal the checkpoint's.

Heavy (about 7 GB RAM with the checkpoint check): run it under `flock /tmp/evomerge-heavy.lock`.

Usage:
    python scripts/bench_dataflow.py [--family DIR] [--candidates 5] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path, default=None)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", choices=["start", "uniform"], default="start",
                    help="candidates near the start point (a first generation) or uniform")
    args = ap.parse_args()

    import torch

    import bench_family
    from evolve.genome import GenomeSpace, GenomeSpec
    from evolve.path_model import PathModels
    from merge.config import MergeConfig
    from merge.engine import MergeOptions, merge_to_folder

    torch.set_num_threads(args.threads)
    dirs = bench_family.build_family(args.family or bench_family.DEFAULT_DIR, log=log)
    refs = [str(dirs["child_a"]), str(dirs["child_b"])]
    space = GenomeSpace.build(GenomeSpec(models=refs, merge_method="passthrough",
                                         layer_stacking={"repeats": 3, "max_layers": 44,
                                                         "scales": "pairs"}))
    rng = random.Random(args.seed)
    points = []
    x0 = space.initial_vector()
    for _ in range(args.candidates):
        if args.points == "uniform":   # worst case: ~2/3 of the slots on, every hop scaled
            x = [rng.uniform(lo, hi) for lo, hi in zip(space.lower, space.upper)]
        else:                          # like CMA-ES's first generation: x0 + 0.25 × range noise
            x = [v + rng.gauss(0, 0.25 * (hi - lo))
                 for v, lo, hi in zip(x0, space.lower, space.upper)]
        points.append(space.clip(x))
    log(f"{space.dim} genes ({space.T} slots, {space.n_scales} scales); "
        f"load {os.getloadavg()[0]:.1f}")

    t0 = time.perf_counter()
    models = PathModels(refs, dtype=torch.bfloat16)
    startup = time.perf_counter() - t0
    log(f"worker start-up (load both models once): {startup:.1f} s")
    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    model = cfg = None
    for k, x in enumerate(points):
        cfg = space.decode(x)
        t0 = time.perf_counter()
        model = models.build(MergeConfig.from_dict(cfg))
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        fwd = time.perf_counter() - t0
        depth = model.config.num_hidden_layers
        rows.append({"depth": depth, "build_s": build, "new_mb": models.last_new_bytes / 2**20,
                     "forward32_s": fwd})
        log(f"candidate {k}: {depth} layers, built in {build * 1000:.0f} ms, new tensors "
            f"{models.last_new_bytes / 2**20:.0f} MiB, forward (32 tokens) {fwd:.2f} s")
    out = Path(tempfile.mkdtemp(prefix="bench-dataflow-"))
    try:
        t0 = time.perf_counter()
        merge_to_folder(MergeConfig.from_dict(cfg), out / "m", MergeOptions(quiet=True))
        disk = time.perf_counter() - t0
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        stock = AutoModelForCausalLM.from_pretrained(out / "m", dtype=torch.bfloat16).eval()
        load = time.perf_counter() - t0
        with torch.no_grad():
            same = torch.equal(stock(input_ids=ids).logits, model(input_ids=ids).logits)
        log(f"last candidate to disk (mergekit-yaml): {disk:.1f} s, loading it back {load:.1f} s; "
            f"in-memory logits equal the checkpoint's: {same}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"startup_s": startup, "candidates": rows, "to_disk_s": disk,
                      "load_back_s": load, "identical": same,
                      "load_average": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
