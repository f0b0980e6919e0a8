#!/usr/bin/env python
"""Benchmark `mergekit-yaml` on a 1.1B-parameter bf16 Llama family against the I/O floor.

What it measures, in one run (all on the same warm page cache — dropping the page cache needs
root, so every input file is read once first and every measurement sees the inputs cached in RAM):

1. the I/O floor: read every tensor of the three inputs (`safe_open(...).get_tensor`, one tensor at
   a time, `.clone()`d because get_tensor only returns a view of the memory map) and write one
   output of the same size with the engine's streaming writer
   (`merge.writer.ShardedWriter`, same 5B shard size as `mergekit-yaml`'s default). It runs in a
   subprocess; the floor is the time of the read+write loop only (interpreter and torch start-up are
   reported separately).
2. the wall time of `mergekit-yaml CONFIG OUT` per method (linear, ties with density 0.5, and
   dare_ties / della when the engine registers them; weights 0.5/0.5, base_model = the base,
   dtype bfloat16), each a subprocess writing a fresh folder under .cache (deleted afterwards unless
   --keep-outputs);
3. the peak RSS of each subprocess (`os.wait4` on the Popen pid → ru_maxrss) and its CPU time,
   plus the peak anonymous / file-backed RSS sampled from /proc/PID/status every 50 ms (mapped
   input pages count in RSS);
4. the ratios against the targets: linear / floor < 2, ties / linear < 3, dare_ties / linear < 3,
   della / linear < 3, peak RSS < 1.5 GB for every method;
5. `mergekit-yaml --help` wall time, min of 5 runs (target < 0.5 s).

The table is printed and written as JSON to .cache/bench_merge.json. Timings are wall-clock on a
shared machine: other processes using the CPU make them noisy (CPU seconds are printed too).

Usage:
    python scripts/bench_merge.py [--methods linear,ties,dare_ties,della] [--repeat N]
                                  [--keep-outputs] [--family DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_family  # noqa: E402

REPO_ROOT = bench_family.REPO_ROOT
CACHE = REPO_ROOT / ".cache"
WORK = CACHE / "bench_merge"
RESULT_JSON = CACHE / "bench_merge.json"
DEFAULT_METHODS = ("linear", "ties", "dare_ties", "della")
OUT_SHARD_SIZE = 5 * 10**9          # mergekit-yaml's default --out-shard-size
RANDOM_SEED = 1234
TARGETS = {"linear/floor": 2.0, "ties/linear": 3.0, "dare_ties/linear": 3.0,
           "della/linear": 3.0, "peak_rss_gb": 1.5, "help_s": 0.5}
GB = 1e9


# --------------------------------------------------------------------------------------------
# helpers


def log(msg: str) -> None:
    print(msg, flush=True)


def mergekit_yaml() -> str:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if exe.is_file():
        return str(exe)
    found = shutil.which("mergekit-yaml")
    if not found:
        sys.exit("error: mergekit-yaml is not on PATH; activate the venv (pip install -e .)")
    return found


class RssSampler(threading.Thread):
    """Polls /proc/PID/status to split the peak RSS into anonymous and file-backed pages.

    ru_maxrss (from wait4) is the authoritative peak; it counts file pages the child has mapped
    (safetensors inputs are memory-mapped, so every input page it touched while the mapping is
    open shows up as RssFile). The sampled peaks say how much of the peak is each kind.
    """

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self.stop.is_set():
            try:
                with open(path) as fh:
                    for line in fh:
                        key = line.split(":", 1)[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            self.stop.wait(self.period)


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run cmd as a child; wall time, exit status, peak RSS and CPU time from os.wait4."""
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        sampler = RssSampler(proc.pid)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    return {"wall_s": wall, "rc": proc.returncode, "peak_rss_bytes": ru.ru_maxrss * 1024,
            "sampled_peak_anon_bytes": sampler.peak["RssAnon"],
            "sampled_peak_file_bytes": sampler.peak["RssFile"],
            "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "log": str(log_path)}


def tail(path: str, n: int = 15) -> str:
    try:
        lines = Path(path).read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def engine_state() -> dict:
    """Which engine code ran: git HEAD, whether the tree is dirty, and a hash of merge/**/*.py
    (the engine changes under concurrent work; a hash that differs between start and end means a
    measurement saw mixed code)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((REPO_ROOT / "merge").rglob("*.py")):
        h.update(str(f.relative_to(REPO_ROOT)).encode())
        h.update(f.read_bytes())

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "merge")
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "merge_dirty": bool(status) if status is not None else None,
            "merge_tree_sha256": h.hexdigest()[:16]}


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def warm_cache(dirs: dict[str, Path]) -> tuple[float, int]:
    """Read every input file once (plain reads) so all measurements see the same warm cache."""
    t0 = time.perf_counter()
    total = 0
    buf = bytearray(64 << 20)
    for d in dirs.values():
        for f in weight_files(d):
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    total += n
    return time.perf_counter() - t0, total


def disk_free_check(needed: int) -> None:
    free = shutil.disk_usage(CACHE).free
    if free < needed:
        sys.exit(f"error: {free / GB:.1f} GB free under {CACHE}; need about {needed / GB:.1f} GB")


# --------------------------------------------------------------------------------------------
# 1. the I/O floor (runs in a child process: `bench_merge.py --_io-floor FAMILY OUT`)


def io_floor_child(family: Path, out: Path) -> None:
    """Read all tensors of the three inputs, write one output of the same size; print JSON."""
    t_start = time.perf_counter()
    import torch  # noqa: F401  (import time is part of start-up, not of the floor)
    from safetensors import safe_open

    from merge.writer import ShardedWriter

    t_import = time.perf_counter() - t_start
    dirs = bench_family.model_dirs(family)
    ref = dirs["base"]
    index = json.loads((ref / "model.safetensors.index.json").read_text())["weight_map"]
    names = list(index)
    out.mkdir(parents=True, exist_ok=False)

    t0 = time.perf_counter()
    c0 = time.process_time()
    handles = {m: {f.name: safe_open(str(f), framework="pt", device="cpu") for f in weight_files(d)}
               for m, d in dirs.items()}
    specs = []
    for name in names:
        sl = handles["base"][index[name]].get_slice(name)
        shape = tuple(sl.get_shape())
        n = 1
        for s in shape:
            n *= s
        specs.append((name, shape, sl.get_dtype(), n * 2))
    writer = ShardedWriter(out, specs, OUT_SHARD_SIZE)
    read_bytes = 0
    t_read = 0.0
    for name in names:
        r0 = time.perf_counter()
        # get_tensor returns a view of the memory map (no bytes read yet): clone() copies the
        # bytes out, so every input byte really is read, as read(2) would.
        ts = [handles[m][index[name]].get_tensor(name).clone() for m in dirs]
        t_read += time.perf_counter() - r0
        read_bytes += sum(t.numel() * t.element_size() for t in ts)
        writer.write(name, ts[-1])
        del ts
    writer.finish()
    writer.abort()  # closes the last shard file
    t_total = time.perf_counter() - t0
    cpu_total = time.process_time() - c0
    written = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"floor_s": t_total, "floor_cpu_s": cpu_total, "read_s": t_read,
                      "write_s": t_total - t_read,
                      "import_s": t_import, "read_bytes": read_bytes, "written_bytes": written}))


def measure_io_floor(family: Path) -> dict:
    out = WORK / "out-io-floor"
    shutil.rmtree(out, ignore_errors=True)
    logp = WORK / "io-floor.log"
    r = run_measured([sys.executable, __file__, "--_io-floor", str(family), str(out)], logp)
    shutil.rmtree(out, ignore_errors=True)
    if r["rc"] != 0:
        sys.exit(f"error: the I/O floor run failed (rc {r['rc']}):\n{tail(r['log'])}")
    lines = [ln for ln in Path(logp).read_text().splitlines() if ln.startswith("{")]
    r.update(json.loads(lines[-1]))
    return r


# --------------------------------------------------------------------------------------------
# 2./3. merges


def merge_config(method: str, dirs: dict[str, Path]) -> dict:
    from merge.methods import METHODS

    m = METHODS[method]
    wanted = {"weight": 0.5, "density": 0.5,
              "epsilon": 0.1}   # della: keep-probabilities density ± epsilon
    per_model = {k: v for k, v in wanted.items() if k in m.params and m.params[k].per_model}
    top = {k: v for k, v in wanted.items() if k in m.params and not m.params[k].per_model}
    cfg = {"merge_method": method,
           "base_model": str(dirs["base"]),
           "models": [{"model": str(dirs[c]), "parameters": dict(per_model)}
                      for c in bench_family.MODELS[1:]],
           "dtype": "bfloat16"}
    if top:
        cfg["parameters"] = top
    return cfg


def measure_merge(method: str, dirs: dict[str, Path], rep: int, keep: bool) -> dict:
    import yaml

    cfg_path = WORK / f"{method}.yml"
    cfg_path.write_text(yaml.safe_dump(merge_config(method, dirs), sort_keys=False))
    out = WORK / f"out-{method}-{rep}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [mergekit_yaml(), str(cfg_path), str(out), "--random-seed", str(RANDOM_SEED)]
    r = run_measured(cmd, WORK / f"{method}-{rep}.log")
    r["cmd"] = " ".join(cmd)
    if r["rc"] == 0:
        files = weight_files(out)
        r["written_bytes"] = sum(f.stat().st_size for f in files)
        if not files:
            r["rc"] = -1
            r["error"] = "mergekit-yaml exited 0 but wrote no safetensors file"
    else:
        r["error"] = tail(r["log"])
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return r


def measure_help(n: int = 5) -> dict:
    exe = mergekit_yaml()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.run([exe, "--help"], capture_output=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            return {"error": p.stderr.decode(errors="replace")[-2000:], "times_s": times}
    return {"min_s": min(times), "times_s": times}


# --------------------------------------------------------------------------------------------
# report


def verdict(value, target) -> str:
    if value is None:
        return "n/a"
    return "ok" if value < target else "MISS"


def build_report(args, family: Path, warm: dict, floor: dict, merges: dict, skipped: dict,
                 helpd: dict, engine: dict) -> dict:
    rows = {}
    for method, runs in merges.items():
        good = [r for r in runs if r["rc"] == 0]
        walls = [r["wall_s"] for r in good]
        rows[method] = {
            "ok": len(good) == len(runs),
            "wall_s_min": min(walls) if walls else None,
            "wall_s_median": statistics.median(walls) if walls else None,
            "cpu_s_min": min(r["cpu_s"] for r in good) if good else None,
            "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / GB,
            "peak_anon_gb": max(r["sampled_peak_anon_bytes"] for r in runs) / GB,
            "peak_file_gb": max(r["sampled_peak_file_bytes"] for r in runs) / GB,
            "runs": runs,
        }
    lin = rows.get("linear", {}).get("wall_s_min")
    lin_cpu = rows.get("linear", {}).get("cpu_s_min")
    ratios, cpu_ratios = {}, {}
    if lin:
        ratios["linear/floor"] = lin / floor["floor_s"]
        # CPU-time ratios: less sensitive to other jobs on the machine (the merge's CPU time
        # includes interpreter/torch start-up, the floor's does not)
        cpu_ratios["linear/floor"] = lin_cpu / floor["floor_cpu_s"]
        for m in rows:
            if m != "linear" and rows[m]["wall_s_min"]:
                ratios[f"{m}/linear"] = rows[m]["wall_s_min"] / lin
                cpu_ratios[f"{m}/linear"] = rows[m]["cpu_s_min"] / lin_cpu
    checks = {k: {"value": v, "target": TARGETS[k], "verdict": verdict(v, TARGETS[k]),
                  "cpu_time_value": cpu_ratios.get(k),
                  "cpu_time_verdict": verdict(cpu_ratios.get(k), TARGETS[k])}
              for k, v in ratios.items() if k in TARGETS}
    for m, row in rows.items():
        goal = TARGETS["peak_rss_gb"]
        checks[f"peak_rss_gb[{m}]"] = {"value": row["peak_rss_gb"], "target": goal,
                                       "verdict": verdict(row["peak_rss_gb"], goal)}
    if "min_s" in helpd:
        checks["help_s"] = {"value": helpd["min_s"], "target": TARGETS["help_s"],
                            "verdict": verdict(helpd["min_s"], TARGETS["help_s"])}
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(),
                    "loadavg_at_end": [round(x, 2) for x in load] if load else None},
        "engine": engine,
        "family": str(family),
        "model_bytes": floor.get("written_bytes"),
        "cache": {"note": "page cache warmed by reading every input file once before measuring; "
                          "not dropped (needs root); all measurements see the same warm cache",
                  **warm},
        "io_floor": {"what": "safe_open(...).get_tensor(name).clone() of every tensor of the 3 "
                             "inputs + merge.writer.ShardedWriter streaming one same-size output "
                             "(5B shards)",
                     **floor},
        "merges": rows,
        "skipped_methods": skipped,
        "help": helpd,
        "repeat": args.repeat,
        "ratios": ratios,
        "cpu_time_ratios": cpu_ratios,
        "checks": checks,
    }


def print_table(rep: dict) -> None:
    floor = rep["io_floor"]
    w = 96
    log("")
    log("=" * w)
    log(f"mergekit-yaml benchmark: 1.1B bf16 Llama family ({rep['model_bytes'] / GB:.2f} GB/model),"
        " "
        f"{rep['machine']['cpus']} CPUs, repeat={rep['repeat']}")
    e = rep["engine"]
    head = e["git_head"] + (" + uncommitted merge/ changes" if e["merge_dirty"] else "")
    if e["git_head_at_end"] != e["git_head"]:
        head += f" (HEAD at end: {e['git_head_at_end']}" + (
            " + uncommitted merge/ changes)" if e["merge_dirty_at_end"] else ")")
    log(f"engine: git {head}, merge/ sha256 {e['merge_tree_sha256']}"
        + ("  (CHANGED DURING THE RUN)" if e["changed_during_run"] else ""))
    log(f"page cache: warmed ({rep['cache']['bytes'] / GB:.1f} GB read in "
        f"{rep['cache']['seconds']:.1f} s) before measuring, never dropped (no root); "
        f"all runs see it warm")
    log("timings are wall-clock on a shared machine (other jobs use the CPU): expect noise; "
        f"load avg at end {rep['machine']['loadavg_at_end']}")
    log(f"I/O floor = {floor['what']}")
    log("-" * w)
    log(f"{'measurement':<34}{'wall s':>9}{'cpu s':>9}{'peak RSS GB':>13}{'anon/file':>12}"
        f"{'vs (wall)':>16}")
    split = (f"{floor['sampled_peak_anon_bytes'] / GB:.2f}/"
             f"{floor['sampled_peak_file_bytes'] / GB:.2f}")
    log(f"{'I/O floor (read 3 + write 1)':<34}{floor['floor_s']:>9.2f}{floor['floor_cpu_s']:>9.2f}"
        f"{floor['peak_rss_bytes'] / GB:>13.2f}{split:>12}")
    log(f"{'  of which read / write':<34}{floor['read_s']:>5.2f} / {floor['write_s']:<5.2f}")
    log(f"{'  floor subprocess incl. start-up':<34}{floor['wall_s']:>9.2f}{floor['cpu_s']:>9.2f}")
    for m, row in rep["merges"].items():
        if row["wall_s_min"] is None:
            log(f"{'mergekit-yaml ' + m:<34}{'FAILED':>9}    see {row['runs'][-1]['log']}")
            continue
        ref = "floor" if m == "linear" else "linear"
        ratio = rep["ratios"].get(f"{m}/{ref}")
        vs = f"{ratio:.2f}x {ref}" if ratio else ""
        split = f"{row['peak_anon_gb']:.2f}/{row['peak_file_gb']:.2f}"
        log(f"{'mergekit-yaml ' + m:<34}{row['wall_s_min']:>9.2f}{row['cpu_s_min']:>9.2f}"
            f"{row['peak_rss_gb']:>13.2f}{split:>12}{vs:>16}")
    for m, why in rep["skipped_methods"].items():
        log(f"{'mergekit-yaml ' + m:<34}{'skipped':>9}  ({why})")
    h = rep["help"]
    log(f"{'mergekit-yaml --help (min of 5)':<34}"
        + (f"{h['min_s']:>9.3f}" if "min_s" in h else f"{'FAILED':>9}"))
    log("peak RSS = ru_maxrss from wait4 (the target); anon/file = sampled peaks of RssAnon and "
        "RssFile (mapped input pages)")
    log("-" * w)
    log(f"{'target':<34}{'value':>9}{'goal':>9}{'':>4}{'verdict':<9}{'by CPU time':>12}")
    for k, c in rep["checks"].items():
        by_cpu = ""
        if c.get("cpu_time_value") is not None:
            by_cpu = f"{c['cpu_time_value']:.2f} {c['cpu_time_verdict']}"
        log(f"{k:<34}{c['value']:>9.2f}{'< ' + format(c['target'], 'g'):>9}{'':>4}"
            f"{c['verdict']:<9}{by_cpu:>12}")
    log("=" * w)
    log(f"JSON: {RESULT_JSON}")


# --------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_io-floor":
        io_floor_child(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated methods (default: %(default)s; those the engine does "
                         "not register are skipped)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (min is reported)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep the merged model folders (under .cache/bench_merge/, until the "
                         "next run)")
    ap.add_argument("--family", type=Path, default=bench_family.DEFAULT_DIR,
                    help="where the benchmark family is built or reused (default: %(default)s)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    from merge.methods import METHODS

    engine_start = engine_state()
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods, skipped = [], {}
    for m in wanted:
        if m in METHODS:
            methods.append(m)
        else:
            skipped[m] = "not registered in merge.methods.METHODS"
            log(f"note: {m} is not registered in the engine yet; skipped")
    if "linear" not in methods:
        log("note: linear is not in --methods; the ratios against linear are not computed")

    CACHE.mkdir(exist_ok=True)
    family_ok = bench_family.check_family(args.family)
    disk_free_check((0 if family_ok else 7 * 10**9)
                    + (len(methods) * args.repeat if args.keep_outputs else 1) * 3 * 10**9)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    dirs = bench_family.build_family(args.family, log=log)

    log("warming the page cache: reading every input file once ...")
    secs, nbytes = warm_cache(dirs)
    warm = {"seconds": secs, "bytes": nbytes}
    log(f"  {nbytes / GB:.1f} GB in {secs:.1f} s")

    log("I/O floor ...")
    floor = measure_io_floor(args.family)
    log(f"  {floor['floor_s']:.2f} s (read {floor['read_s']:.2f} s, "
        f"write {floor['write_s']:.2f} s),"
        f" peak RSS {floor['peak_rss_bytes'] / GB:.2f} GB")

    merges: dict[str, list] = {}
    for rep in range(args.repeat):
        for m in methods:
            log(f"mergekit-yaml {m} (run {rep + 1}/{args.repeat}) ...")
            r = measure_merge(m, dirs, rep, args.keep_outputs)
            merges.setdefault(m, []).append(r)
            if r["rc"] == 0:
                log(f"  {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, peak RSS "
                    f"{r['peak_rss_bytes'] / GB:.2f} GB")
            else:
                log(f"  FAILED (rc {r['rc']}):\n{r.get('error', '')}")

    log("mergekit-yaml --help x5 ...")
    helpd = measure_help()

    engine_end = engine_state()
    # a commit of the same code changes HEAD but not what ran: compare the code itself
    engine = {**engine_start, "git_head_at_end": engine_end["git_head"],
              "merge_dirty_at_end": engine_end["merge_dirty"],
              "changed_during_run": (engine_end["merge_tree_sha256"]
                                     != engine_start["merge_tree_sha256"])}
    if engine["changed_during_run"]:
        log(f"WARNING: the engine code changed during the run ({engine_start} -> {engine_end}); "
            f"the measurements may mix versions")
    rep = build_report(args, args.family, warm, floor, merges, skipped, helpd, engine)
    RESULT_JSON.write_text(json.dumps(rep, indent=2) + "\n")
    print_table(rep)


if __name__ == "__main__":
    main()
