#!/usr/bin/env python
"""How accurate are half-precision merges? Ours (compute in fp32, round once) against the reference
toolkit (mergekit 0.1.5 computes in the configured dtype), both against fp64.

For each dtype (bfloat16, float16) a tiny Llama family (base + 3 children) is built in that dtype;
each method's config (`dtype` = that dtype) is merged by `mergekit-yaml` of both tools; every
output entry is compared with the same formula evaluated in float64 on the same (half-precision)
inputs, and the error is expressed in ulps of the output dtype at the exact value:

    err = |out − exact| / ulp(exact)      (ulp floored at 1e-3 of the tensor's RMS)

Printed per method and tool: mean and max error over all entries, and the share of entries that
are not the correctly rounded result (err > 0.5). Entries where a task vector's magnitude equals a
TIES cut-off value are left out for the methods that prune (which of the equal entries is kept is
unspecified in the reference); how many is printed.

Usage:
    python scripts/precision_check.py [--reference /work/refvenv/bin/mergekit-yaml] [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

MANTISSA = {"bfloat16": 7, "float16": 10}
MIN_EXP = {"bfloat16": -126, "float16": -14}

WEIGHTS = [0.5, 0.3, 0.2]
DENSITIES = [0.5, 0.7, 0.33]


def methods():
    """name -> (config parameters, per-model parameters)."""
    per = [{"weight": w} for w in WEIGHTS]
    dens = [{"weight": w, "density": d} for w, d in zip(WEIGHTS, DENSITIES)]
    return {
        "linear": ({}, per),
        "task_arithmetic": ({"lambda": 0.9}, per),
        "ties": ({}, dens),
        "breadcrumbs_ties": ({"normalize": True}, [dict(p, gamma=0.05) for p in dens]),
        "model_stock": ({}, None),
        "sce": ({}, None),
    }


# --- exact (float64) formulas -----------------------------------------------------------------------

def top_mask(tau, k):
    """The k largest |τ| (ties by position), as the kernels keep them."""
    import torch

    m = torch.zeros(tau.numel(), dtype=torch.bool)
    m[tau.abs().reshape(-1).sort(descending=True, stable=True).indices[:k]] = True
    return m.view(tau.shape)


def cutoff_ties(tau, ks):
    """Entries whose |τ| equals one of the cut-off values (k-th largest |τ|)."""
    import torch

    a = tau.abs().reshape(-1)
    srt = a.sort(descending=True).values
    out = torch.zeros_like(a, dtype=torch.bool)
    for k in ks:
        if 0 < k < a.numel() and srt[k - 1] > 0:
            out |= a == srt[k - 1]
    return out.view(tau.shape)


def consensus(deltas, weights, normalize):
    import torch

    s = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).double()
    keep = deltas * s > 0
    merged = (deltas * keep).sum(0)
    if normalize:
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (deltas.dim() - 1))
        div = (w * keep).sum(0)
        merged = merged / torch.where(div == 0, torch.ones_like(div), div)
    return merged


def exact(method, params, mp, base, xs):
    """(float64 result, mask of entries left out) for one tensor."""
    import torch

    b = base.double()
    x = [t.double() for t in xs]
    tau = [t - b for t in x]
    skip = torch.zeros(b.shape, dtype=torch.bool)
    n = b.numel()
    if method == "linear":
        return sum(w * t for w, t in zip(WEIGHTS, x)) / sum(WEIGHTS), skip
    if method == "task_arithmetic":
        return b + params["lambda"] * sum(w * t for w, t in zip(WEIGHTS, tau)), skip
    if method in ("ties", "breadcrumbs_ties"):
        deltas = []
        for p, t in zip(mp, tau):
            keep = int(p["density"] * n)
            if method == "ties":
                keep = max(1, keep)
                m, ks = top_mask(t, keep), [keep]
            else:
                top = min(int(p["gamma"] * n), n - keep)
                m = top_mask(t, top + keep) & ~top_mask(t, top)
                ks = [top, top + keep]
            skip |= cutoff_ties(t, ks)
            deltas.append(p["weight"] * t * m)
        return b + consensus(torch.stack(deltas), [p["weight"] for p in mp], True), skip
    if method == "model_stock":
        flat = [t.reshape(-1) for t in tau]
        cos = [float(flat[i] @ flat[j]) / max(float(flat[i].norm() * flat[j].norm()), 1e-6)
               for i in range(3) for j in range(i + 1, 3)]
        c = sum(max(-1.0, min(1.0, v)) for v in cos) / len(cos)
        d = 1 + 2 * c
        t_ = 0.0 if abs(d) < 1e-6 else 3 * c / d
        return b + t_ * sum(tau) / 3, skip
    if method == "sce":
        stack = torch.stack(tau)
        means = (stack ** 2).reshape(3, -1).mean(1)
        w = means / means.sum() if float(means.sum()) >= 1e-6 else torch.full((3,), 1 / 3.0,
                                                                            dtype=torch.float64)
        s = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
        ew = w.view(-1, *[1] * b.dim()) * (stack * s > 0)
        return b + (stack * ew).sum(0) / ew.sum(0).clamp_min(1e-6), skip
    raise ValueError(method)


def ulp(values, dtype: str):
    """The spacing of `dtype` at each exact value; values below 1e-3 of the tensor's RMS are
    measured at that floor (where the exact result is a near-cancellation, an absolute error that
    is small against the inputs would otherwise count as millions of ulps, for every tool)."""
    import torch

    floor = max(float(values.pow(2).mean().sqrt()) * 1e-3, 2.0 ** MIN_EXP[dtype])
    a = values.abs().clamp_min(floor)
    e = torch.floor(torch.log2(a))
    return torch.pow(2.0, e - MANTISSA[dtype])


# --- running the tools -------------------------------------------------------------------------------

def run_tool(cmd, cfg: Path, out: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([*cmd, str(cfg), str(out)], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed on {cfg}:\n{r.stderr[-2000:]}")


def load(folder: Path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default="/work/refvenv/bin/mergekit-yaml")
    ap.add_argument("--work", type=Path, default=None, help="folder for families and outputs")
    args = ap.parse_args()
    import torch
    import yaml
    from tinymodels import build_family

    work = args.work or Path(tempfile.mkdtemp(prefix="precision-"))
    ours = [sys.executable, "-c", "import sys; from merge.cli import main; main()"]
    tools = {"ours": ours + ["--overwrite", "-q", "--no-copy-tokenizer"],
             "reference": [args.reference, "--no-copy-tokenizer"]}
    print(f"{'dtype':<9}{'method':<18}{'tool':<10}{'mean ulp':>9}{'max ulp':>9}"
          f"{'not rounded':>13}{'left out':>10}")
    for dtype in ("bfloat16", "float16"):
        fam = build_family(work / dtype, children=3, dtype=getattr(torch, dtype))
        fam = {k: Path(v).resolve() for k, v in fam.items()}
        inputs = {k: load(v) for k, v in fam.items()}
        for method, (params, mp) in methods().items():
            cfg = {"merge_method": method, "dtype": dtype,
                   "models": [{"model": str(fam[f"c{i}"]),
                               **({"parameters": mp[i]} if mp else {})} for i in range(3)]}
            if method != "linear":
                cfg["base_model"] = str(fam["base"])
            if params:
                cfg["parameters"] = params
            path = work / f"{dtype}-{method}.yml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            for tool, cmd in tools.items():
                out_dir = work / f"out-{dtype}-{method}-{tool}"
                run_tool(cmd, path, out_dir)
                merged = load(out_dir)
                errs, left = [], 0
                for name, got in merged.items():
                    want, skip = exact(method, params, mp, inputs["base"][name],
                                       [inputs[f"c{i}"][name] for i in range(3)])
                    err = (got.double() - want).abs() / ulp(want, dtype)
                    errs.append(err[~skip].reshape(-1))
                    left += int(skip.sum())
                e = torch.cat(errs)
                print(f"{dtype:<9}{method:<18}{tool:<10}{float(e.mean()):>9.3f}"
                      f"{float(e.max()):>9.2f}{float((e > 0.5).double().mean()):>13.4f}"
                      f"{left:>10d}", flush=True)


if __name__ == "__main__":
    main()
