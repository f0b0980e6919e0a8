"""What a search leaves behind for people: best_config.yaml, report.png, report.html, best_model/.

The plots come from history.jsonl and the per-generation statistics alone, so a report can be
re-drawn at any time, also for a run that was interrupted.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional

import yaml

from evolve.genome import GenomeSpace
from evolve.storage import RunStore, write_atomic


class _FlowListDumper(yaml.SafeDumper):
    """Lists of numbers (gradients, layer ranges) on one line: configs stay readable."""


def _represent_list(dumper, data):
    flow = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def dump_config(config: dict) -> str:
    return yaml.dump(config, Dumper=_FlowListDumper, sort_keys=False)


def write_best_config(store: RunStore, record: dict, merge_seed: Optional[int]) -> None:
    seed = f" --random-seed {merge_seed}" if merge_seed is not None else ""
    scores = ", ".join(f"{k} {v:.4g}" for k, v in (record.get("scores") or {}).items())
    header = (f"# best merge found by mergekit-evolve: fitness {record['fitness']:.6g} ({scores})\n"
              f"# generation {record['generation']}, candidate {record['index']}\n"
              f"# reproduce: mergekit-yaml best_config.yaml OUT_DIR{seed}\n")
    write_atomic(store.best_config, (header + dump_config(record["config"])).encode())


def merge_best(store: RunStore, record: dict, device: str, merge_seed: Optional[int],
               trust_remote_code: bool = False) -> Path:
    """The best candidate as a model folder, merged exactly as it was evaluated."""
    from merge.config import MergeConfig
    from merge.engine import MergeOptions, merge_to_folder

    config = MergeConfig.from_dict(record["config"])
    written = store.best_model / "mergekit_config.yml"
    if written.is_file() and yaml.safe_load(written.read_text()) == config.to_dict():
        return store.best_model     # already there (a resumed run that found nothing better)
    options = MergeOptions(device=device, random_seed=merge_seed, overwrite=True, quiet=True,
                           trust_remote_code=trust_remote_code)
    return merge_to_folder(config, store.best_model, options)


# --- figures ------------------------------------------------------------------------------------
def render_png(store: RunStore, space: GenomeSpace, history: list[dict],
               stats: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = _best(history)
    grids = space.grids(best["genome"]) if best else []
    n_maps = len(grids)
    cols = max(2, min(4, n_maps))
    rows = 1 + (-(-n_maps // cols) if n_maps else 0)
    fig = plt.figure(figsize=(4.2 * cols, 3.6 * rows), constrained_layout=True)
    gs = fig.add_gridspec(rows, cols)

    top = gs[0, :].subgridspec(1, 2)   # fitness and sigma share the first row evenly
    ax = fig.add_subplot(top[0, 0])
    ok = [r for r in history if r.get("fitness") is not None]
    if ok:
        ax.scatter([r["generation"] for r in ok], [r["fitness"] for r in ok], s=10, alpha=0.35,
                   color="gray", label="candidates")
    failed = [r for r in history if r.get("fitness") is None]
    if failed and ok:
        lo = min(r["fitness"] for r in ok)
        ax.scatter([r["generation"] for r in failed], [lo] * len(failed), marker="x",
                   color="red", label="failed")
    if stats:
        gens = [s["generation"] for s in stats]
        ax.plot(gens, [s["best"] for s in stats], "-o", ms=3, label="best of generation")
        ax.plot(gens, [s["mean"] for s in stats], "-", label="mean of generation")
        ax.plot(gens, [s["best_so_far"] for s in stats], "--", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.set_title("fitness")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)

    ax = fig.add_subplot(top[0, 1])
    if stats:
        sigmas = [s["sigma"] for s in stats]
        ax.plot([s["generation"] for s in stats], sigmas, "-o", ms=3)
        if max(sigmas) > 10 * min(sigmas):
            ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_title("CMA-ES step size σ")

    for k, (title, row_labels, col_labels, values) in enumerate(grids):
        ax = fig.add_subplot(gs[1 + k // cols, k % cols])
        p = next(p for p in space.params if title.split(" ")[0] == p.name)
        im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=p.low, vmax=p.high)
        ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                bright = (v - p.low) / (p.high - p.low) > 0.6   # viridis turns yellow up there
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if bright else "white")
        ax.set_title(f"best genome: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def render_html(store: RunStore, space: GenomeSpace, history: list[dict], stats: list[dict],
                png: bytes, meta: dict, outcome: Optional[str]) -> str:
    best = _best(history)
    esc = html.escape
    ok = [r for r in history if r.get("fitness") is not None]
    top = sorted(ok, key=lambda r: -r["fitness"])[:10]
    tasks = list((best or {}).get("scores") or {})
    rows = "".join(
        f"<tr><td>{r['generation']}</td><td>{r['index']}</td><td>{r['fitness']:.4f}</td>"
        + "".join(f"<td>{(r.get('scores') or {}).get(t, float('nan')):.4f}</td>" for t in tasks)
        + f"<td>{r.get('seconds', 0):.2f}</td><td>{esc(str(r.get('worker')))}</td></tr>"
        for r in top)
    gen_rows = "".join(
        f"<tr><td>{s['generation']}</td><td>{s['best']:.4f}</td><td>{s['mean']:.4f}</td>"
        f"<td>{s['best_so_far']:.4f}</td><td>{s['sigma']:.4g}</td><td>{s['failed']}</td>"
        f"<td>{s['fevals']}</td></tr>" for s in stats)
    failed = [r for r in history if r.get("fitness") is None]
    fail_rows = "".join(f"<tr><td>{r['generation']}</td><td>{r['index']}</td>"
                        f"<td>{esc(str(r.get('error')))}</td></tr>" for r in failed[:20])
    summary = {
        "evaluations": len(history), "failed": len(failed), "generations": len(stats),
        "best fitness": f"{best['fitness']:.6g}" if best else "-",
        "best candidate": f"generation {best['generation']}, #{best['index']}" if best else "-",
        "genes": space.dim, "status": outcome or "running",
        "started": meta.get("started", "?"),
    }
    summary_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                           for k, v in summary.items())
    config = esc(dump_config(best["config"])) if best else "(no successful evaluation yet)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mergekit-evolve report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}pre{{background:#f6f6f6;padding:8px}}
</style></head><body>
<h1>mergekit-evolve report</h1>
<table>{summary_rows}</table>
<h2>Progress and best genome</h2>
<img src="data:image/png;base64,{base64.b64encode(png).decode()}" style="max-width:100%">
<h2>Best merge config</h2><pre>{config}</pre>
<h2>Top candidates</h2>
<table><tr><th>gen</th><th>#</th><th>fitness</th>{''.join(f'<th>{esc(t)}</th>' for t in tasks)}
<th>seconds</th><th>worker</th></tr>{rows}</table>
<h2>Generations</h2>
<table><tr><th>gen</th><th>best</th><th>mean</th><th>best so far</th><th>σ</th><th>failed</th>
<th>evaluations</th></tr>{gen_rows}</table>
{'<h2>Failed evaluations</h2><table><tr><th>gen</th><th>#</th><th>error</th></tr>' + fail_rows
 + '</table>' if failed else ''}
<h2>Search space</h2><pre>{esc(space.describe())}</pre>
<p>Every evaluation is in <code>history.jsonl</code>; the run's settings in
<code>run.json</code>.</p>
</body></html>
"""


def write_report(store: RunStore, space: GenomeSpace, history: list[dict], stats: list[dict],
                 outcome: Optional[str] = None) -> None:
    meta = json.loads(store.run_json.read_text()) if store.run_json.is_file() else {}
    png = render_png(store, space, history, stats)
    write_atomic(store.report_png, png)
    write_atomic(store.report_html, render_html(store, space, history, stats, png, meta,
                                                outcome).encode())


def _best(history: list[dict]) -> Optional[dict]:
    ok = [r for r in history if r.get("fitness") is not None]
    return max(ok, key=lambda r: r["fitness"]) if ok else None
