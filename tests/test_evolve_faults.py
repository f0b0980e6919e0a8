"""No hang, ever: hung evaluations, a killed raylet, SIGINT during a hung evaluation and a full
disk, on a real local Ray with the tiny family and lm-eval. Each fault ends in a one-line message
or a recovery within a bounded time; the times are printed (pytest -s) for the notes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from evolve.cli import main
from evolve.faults import HANG_ENV, EvalLimits, deadline_grace, disk_full_error, is_disk_full
from evolve.storage import RunStore


def genome(family) -> dict:
    return {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "task_arithmetic",
            "base_model": str(family["base"]), "layer_granularity": 0}


def run_cli(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def history(storage: Path) -> list[dict]:
    return [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]


# --- the rules --------------------------------------------------------------------------------
def test_the_adaptive_limit_follows_the_median_with_a_floor_and_a_generous_first():
    limits = EvalLimits(first=600, floor=30, factor=5)
    assert limits.limit(first_on_actor=True) == 600 and limits.limit(first_on_actor=False) == 600
    for s in (2.0, 3.0, 100.0):          # one slow outlier does not move the median much
        limits.observe(s)
    assert limits.limit(first_on_actor=False) == 30          # 5 × 3 s is under the floor
    for s in (40.0, 50.0, 60.0):
        limits.observe(s)
    assert limits.limit(first_on_actor=False) == 5 * 45.0
    assert limits.limit(first_on_actor=True) == 600
    assert EvalLimits(fixed=7).limit(first_on_actor=True) == 7
    rungs = EvalLimits(floor=1, factor=5)       # multi-fidelity: 24-item and 156-item evaluations
    for _ in range(7):
        rungs.observe(12.0, items=24)
    assert rungs.limit(first_on_actor=False, items=156) == pytest.approx(5 * 0.5 * 156)
    assert rungs.limit(first_on_actor=False, items=24) == pytest.approx(60)
    assert deadline_grace(45) == 10 and deadline_grace(300) == 30 and deadline_grace(7200) == 60


def test_a_disk_full_message_names_the_folder_and_what_it_needs(tmp_path):
    (tmp_path / ".checkpoint.pkl.tmp-123").write_bytes(b"partial")
    e = OSError(28, "No space left on device", str(tmp_path / "history.jsonl"))
    assert is_disk_full(e) and not is_disk_full(OSError(2, "missing"))
    msg = str(disk_full_error(e, tmp_path, needs=5 * 2**20))
    assert f"'{tmp_path}'" in msg and "No space left on device while writing history.jsonl" in msg
    assert "needs about 5.0 MB" in msg and "--resume" in msg and "\n" not in msg
    assert not (tmp_path / ".checkpoint.pkl.tmp-123").exists()   # our partial write removed


# --- hung evaluations ---------------------------------------------------------------------------
def test_a_hung_evaluation_is_killed_retried_then_recorded_as_failed(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys, monkeypatch):
    """Two hangs: the first candidate's first attempt and its retry. The worker is killed at the
    limit and replaced each time; the candidate is recorded as failed, the search goes on."""
    marker = tmp_path / "hung"
    monkeypatch.setenv(HANG_ENV, f"{marker}:2")
    path = make_genome(tmp_path / "g.yaml", genome(family), limit=8)
    storage = tmp_path / "run"
    t0 = time.monotonic()
    code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                              "--workers", 1, "--popsize", 2, "--max-fevals", 4, "--no-wandb",
                              "--no-merge-best", "--eval-timeout", 3, "-q", "--fidelity", "full"],
                             capsys)
    elapsed = time.monotonic() - t0
    assert code == 0, err
    assert len(marker.read_text().splitlines()) == 2          # it really hung twice
    assert err.count("evaluation still running after 3s (its time limit); worker killed") == 2
    records = history(storage)
    assert len(records) == 4 and len({(r["generation"], r["index"]) for r in records}) == 4
    failed = [r for r in records if r["fitness"] is None]
    assert len(failed) == 1 and failed[0]["error"] == "evaluation timed out after 3s on 2 attempt(s)"
    assert failed[0]["attempt"] == 2
    print(f"\n[faults] two 3-s hangs, kill+replace+retry, whole run: {elapsed:.1f}s")


def test_the_run_deadline_abandons_a_hung_evaluation(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys, monkeypatch):
    """`--timeout 4` with an evaluation that never returns and no per-evaluation limit to save
    us: the run stops at the deadline plus the grace (10 s), resumable."""
    monkeypatch.setenv(HANG_ENV, f"{tmp_path / 'hung'}:100")
    path = make_genome(tmp_path / "g.yaml", genome(family), limit=8)
    storage = tmp_path / "run"
    t0 = time.monotonic()
    code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                              "--workers", 1, "--popsize", 2, "--max-fevals", 4, "--no-wandb",
                              "--no-merge-best", "--timeout", 4, "--eval-timeout", 3600, "-q"],
                             capsys)
    elapsed = time.monotonic() - t0
    assert "abandoning 1 evaluation(s) still running after 10s of grace" in err
    assert "stopped (timeout) after 0 evaluations" in out and code == 1
    assert RunStore(storage).load_checkpoint()["asked"] is not None      # resumable
    print(f"\n[faults] --timeout 4 with a hung evaluation: driver done after {elapsed:.1f}s")


def test_workers_the_cluster_cannot_place_now_fail_in_seconds_with_one_line(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys):
    """Another job holds the cluster's CPUs: Ray would queue our workers until it ends."""
    import ray

    @ray.remote(num_cpus=2)
    class OtherJob:
        def ping(self):
            return 1

    other = OtherJob.remote()
    ray.get(other.ping.remote())
    try:
        path = make_genome(tmp_path / "g.yaml", genome(family), limit=8)
        t0 = time.monotonic()
        code, out, err = run_cli([path, "--storage-path", tmp_path / "run", "--task-search-path",
                                  toy_task_dir, "--workers", 1, "--no-wandb"], capsys)
        elapsed = time.monotonic() - t0
    finally:
        ray.kill(other)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "only 0 of the Ray cluster's 2 are free now (other jobs hold the rest)" in lines[0]
    assert elapsed < 60 and not (tmp_path / "run" / "run.json").exists()
    print(f"\n[faults] unplaceable workers -> one line after {elapsed:.1f}s")


# --- the driver as a process: raylet killed, SIGINT ---------------------------------------------
@pytest.fixture
def short_tmp():
    path = tempfile.mkdtemp(prefix="evf-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _driver(family, toy_task_dir, tmp_path, make_genome, short_tmp, extra_env, *args):
    path = make_genome(tmp_path / "g.yaml", genome(family), limit=8)
    storage = tmp_path / "run"
    cmd = [sys.executable, "-c", "from evolve.cli import main; main()", str(path),
           "--storage-path", str(storage), "--task-search-path", str(toy_task_dir),
           "--no-wandb", "--no-merge-best", "-q", *map(str, args)]
    env = {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": short_tmp, **extra_env}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    return proc, storage


def _wait_for(predicate, proc, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def _cleanup(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)     # whatever is left of its session: ours only
    except ProcessLookupError:
        pass


def test_a_killed_raylet_ends_the_driver_in_one_line_and_the_run_resumes(
        family, toy_task_dir, tmp_path, make_genome, short_tmp):
    import psutil

    proc, storage = _driver(family, toy_task_dir, tmp_path, make_genome, short_tmp, {},
                            "--workers", 1, "--popsize", 2, "--max-fevals", 100000)
    try:
        hist = storage / "history.jsonl"
        _wait_for(lambda: hist.exists() and len(hist.read_text().splitlines()) >= 2, proc, 240)
        raylets = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.name() == "raylet"]
        assert len(raylets) == 1
        t0 = time.monotonic()
        raylets[0].kill()
        out, err = proc.communicate(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        _cleanup(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: Ray: the local raylet died") and "--resume" in lines[0]
    assert elapsed < 30
    done = history(storage)
    assert len(done) >= 2 and RunStore(storage).load_checkpoint() is not None
    print(f"\n[faults] raylet SIGKILL -> driver's one-line exit: {elapsed:.1f}s")


def test_sigint_during_a_hung_evaluation_stops_the_driver_and_its_workers(
        family, toy_task_dir, tmp_path, make_genome, short_tmp):
    import psutil

    marker = tmp_path / "hung"
    proc, storage = _driver(family, toy_task_dir, tmp_path, make_genome, short_tmp,
                            {HANG_ENV: f"{marker}:100"}, "--workers", 1, "--popsize", 2,
                            "--max-fevals", 4)
    try:
        _wait_for(lambda: marker.exists() and marker.read_text().strip(), proc, 240)
        worker = psutil.Process(int(marker.read_text().split()[0]))
        tree = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)            # the driver alone, as `kill -INT` does
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        gone, alive = psutil.wait_procs([worker, *tree], timeout=15)
    finally:
        _cleanup(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not alive, [p.info if hasattr(p, "info") else p for p in alive]
    print(f"\n[faults] SIGINT during a hung evaluation -> driver exit: {elapsed:.1f}s")


# --- a full disk ------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (needs root and a sandbox that allows mounts; skipped otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path, leave: int = 0) -> Path:
    filler = folder / ".filler"
    with open(filler, "wb") as f:
        try:
            while True:
                free = shutil.disk_usage(folder).free - leave
                if free <= 0:
                    break
                f.write(b"\0" * min(free, 1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_at_start_and_mid_run_is_one_line_and_the_run_resumes(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys, tiny_disk):
    path = make_genome(tmp_path / "g.yaml", genome(family), limit=8)
    storage = tiny_disk / "run"
    args = [path, "--storage-path", storage, "--task-search-path", toy_task_dir, "--workers", 1,
            "--popsize", 2, "--max-fevals", 6, "--no-wandb", "--no-merge-best", "-q",
            "--fidelity", "full"]
    filler = _fill(tiny_disk)                       # full before the run starts
    code, out, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: --storage-path: no space left under '{storage}'")
    assert "the run needs about" in lines[0]
    filler.unlink()

    # mid-run: the disk fills up once two evaluations are in the history
    hist = storage / "history.jsonl"
    stop = threading.Event()

    def fill_when_running():
        while not stop.is_set():
            if hist.exists() and len(hist.read_text().splitlines()) >= 2:
                _fill(tiny_disk)
                return
            time.sleep(0.02)
    filling = threading.Thread(target=fill_when_running)
    filling.start()
    try:
        code, out, err = run_cli(args, capsys)
    finally:
        stop.set()
        filling.join()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no space left under" in lines[0], err
    (tiny_disk / ".filler").unlink()
    code, out, err = run_cli(args + ["--resume"], capsys)
    assert code == 0, err
    records = history(storage)
    assert sorted((r["generation"], r["index"]) for r in records) == [
        (g, i) for g in range(3) for i in range(2)]
