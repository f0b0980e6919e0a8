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


def write_front(store: RunStore, history: list[dict], goals: dict[str, str],
                merge_seed: Optional[int]) -> list[dict]:
    """STORAGE/pareto/: `front.json` (every member's scores, fitness and place in the history) and
    one merge config per member, `front-NN.yaml` (NN = position, best weighted fitness first);
    files of members that left the front are removed."""
    from evolve.pareto import front as pareto_front

    members = pareto_front(history, goals)
    folder = store.root / "pareto"
    folder.mkdir(parents=True, exist_ok=True)
    seed = f" --random-seed {merge_seed}" if merge_seed is not None else ""
    names = []
    for n, r in enumerate(members, 1):
        name = f"front-{n:02d}.yaml"
        names.append(name)
        scores = ", ".join(f"{t} {r['scores'][t]:.4g} ({goals[t]})" for t in goals)
        header = (f"# Pareto front member {n} of {len(members)} found by mergekit-evolve: {scores}; "
                  f"weighted fitness {r['fitness']:.6g}\n"
                  f"# generation {r['generation']}, candidate {r['index']}\n"
                  f"# reproduce: mergekit-yaml {name} OUT_DIR{seed}\n")
        write_atomic(folder / name, (header + dump_config(r["config"])).encode())
    for old in folder.glob("front-*.yaml"):
        if old.name not in names:
            old.unlink()
    summary = [{"file": name, "generation": r["generation"], "index": r["index"],
                "scores": r["scores"], "fitness": r["fitness"]} for name, r in zip(names, members)]
    write_atomic(folder / "front.json", (json.dumps({"goals": goals, "front": summary},
                                                     indent=2) + "\n").encode())
    return members


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
               stats: list[dict], goals: Optional[dict] = None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = _best(history)
    grids = space.grids(best["genome"]) if best else []
    n_maps = len(grids)
    pairs = _objective_pairs(goals)
    cols = max(2, min(4, n_maps), min(4, len(pairs)))
    rows = 1 + (-(-n_maps // cols) if n_maps else 0) + (-(-len(pairs) // cols) if pairs else 0)
    fig = plt.figure(figsize=(4.2 * cols, 3.6 * rows), constrained_layout=True)
    gs = fig.add_gridspec(rows, cols)

    top = gs[0, :].subgridspec(1, 2)   # fitness and sigma share the first row evenly
    ax = fig.add_subplot(top[0, 0])
    ok = [r for r in history if r.get("fitness") is not None]
    full_ok = [r for r in ok if r.get("full", True)]
    low_ok = [r for r in ok if not r.get("full", True)]
    if full_ok:
        ax.scatter([r["generation"] for r in full_ok], [r["fitness"] for r in full_ok], s=10,
                   alpha=0.35, color="gray", label="candidates")
    if low_ok:   # multi-fidelity rung 0: a score on a few items (evolve.fidelity)
        ax.scatter([r["generation"] for r in low_ok], [r["fitness"] for r in low_ok], s=12,
                   alpha=0.5, facecolors="none", edgecolors="tab:blue",
                   label="on an item subset (rung 0)")
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

    if pairs:
        from evolve.pareto import front as pareto_front

        members = pareto_front(history, goals)
        full = [r for r in ok if r.get("full", True)]
        chosen = _best(history)
        for k, (a, b) in enumerate(pairs):
            ax = fig.add_subplot(gs[1 + k // cols, k % cols])
            ax.scatter([r["scores"][a] for r in full], [r["scores"][b] for r in full], s=10,
                       alpha=0.35, color="gray", label="candidates")
            pts = sorted((r["scores"][a], r["scores"][b]) for r in members)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:orange", ms=5,
                    label=f"Pareto front ({len(members)})")
            if chosen:
                ax.plot([chosen["scores"][a]], [chosen["scores"][b]], "*", color="tab:red",
                        ms=12, label="best_config (weighted)")
            ax.set_xlabel(f"{a} ({_arrow(goals[a])})", fontsize=8)
            ax.set_ylabel(f"{b} ({_arrow(goals[b])})", fontsize=8)
            ax.set_title("objectives" + (" (front over all tasks)" if len(goals) > 2 else ""),
                         fontsize=9)
            ax.legend(fontsize=6)
    first_map_row = 1 + (-(-len(pairs) // cols) if pairs else 0)
    for k, (title, row_labels, col_labels, values) in enumerate(grids):
        ax = fig.add_subplot(gs[first_map_row + k // cols, k % cols])
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
                png: bytes, meta: dict, outcome: Optional[str],
                goals: Optional[dict] = None) -> str:
    best = _best(history)
    esc = html.escape
    ok = [r for r in history if r.get("fitness") is not None and r.get("full", True)]
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
{_front_html(history, goals)}
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
                 outcome: Optional[str] = None, goals: Optional[dict] = None) -> None:
    meta = json.loads(store.run_json.read_text()) if store.run_json.is_file() else {}
    png = render_png(store, space, history, stats, goals)
    write_atomic(store.report_png, png)
    write_atomic(store.report_html, render_html(store, space, history, stats, png, meta,
                                                outcome, goals).encode())


def _objective_pairs(goals: Optional[dict]) -> list[tuple[str, str]]:
    names = list(goals or {})
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]][:8]


def _arrow(goal: str) -> str:
    return "higher is better" if goal == "maximize" else "lower is better"


def _front_html(history: list[dict], goals: Optional[dict]) -> str:
    if not goals:
        return ""
    from evolve.pareto import front as pareto_front

    esc = html.escape
    members = pareto_front(history, goals)
    rows = "".join(
        f"<tr><td>pareto/front-{n:02d}.yaml</td><td>{r['generation']}</td><td>{r['index']}</td>"
        + "".join(f"<td>{r['scores'][t]:.4f}</td>" for t in goals)
        + f"<td>{r['fitness']:.4f}</td></tr>" for n, r in enumerate(members, 1))
    head = "".join(f"<th>{esc(t)} ({'max' if g == 'maximize' else 'min'})</th>"
                   for t, g in goals.items())
    return (f"<h2>Pareto front ({len(members)} candidates)</h2><p>No member is better on every "
            f"task than another; <code>best_config.yaml</code> is the first (best weighted "
            f"fitness).</p><table><tr><th>config</th><th>gen</th><th>#</th>{head}"
            f"<th>weighted fitness</th></tr>{rows}</table>")


def _best(history: list[dict]) -> Optional[dict]:
    ok = [r for r in history if r.get("fitness") is not None and r.get("full", True)]
    return max(ok, key=lambda r: r["fitness"]) if ok else None
