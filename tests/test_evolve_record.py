"""A search's record is never lost (issue 15): damaged, torn or emptied histories, signals, failed
starts, placement, input models that change mid-search and storage paths that cannot be used.

Every fault is compared with one uninterrupted run of the same genome and seed (`reference`): a
resumed run must make exactly the evaluations the uninterrupted one made. Real Ray (one session
for the in-process runs), real lm-eval on the toy task, tiny models; subprocesses only where a
signal or an exit code of a fresh process must be observed."""
from __future__ import annotations

import contextlib
import io
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
import yaml

from conftest import write_genome
from evolve.cli import main

REPO = Path(__file__).resolve().parent.parent
FEVALS = 24
COMMON = ["--workers", 1, "--popsize", 4, "--seed", 7]


def evolve(*args) -> tuple[int, str, str]:
    """mergekit-evolve in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def last_error_line(err: str) -> str:
    """A failure after the run started: progress lines, then one error line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


def records(storage: Path) -> dict:
    out = {}
    for line in (storage / "history.jsonl").read_text().splitlines():
        r = json.loads(line)
        key = (r["generation"], r["index"])
        assert key not in out, f"{key} evaluated twice"
        out[key] = (r["genome"], r["scores"], r["fitness"], r["error"])
    return out


def best_header(storage: Path) -> tuple[float, int, int]:
    head = (storage / "best_config.yaml").read_text().splitlines()[:2]
    fitness = float(head[0].split("fitness ")[1].split()[0])
    g, i = head[1].removeprefix("# generation ").split(", candidate ")
    return fitness, int(g), int(i)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A family of our own: tests here delete and damage its members."""
    import tinymodels

    return tinymodels.build_family(tmp_path_factory.mktemp("fam"), children=2)


@pytest.fixture(scope="module")
def project(tmp_path_factory, toy_task_dir) -> Path:
    """One project folder holding the task and every run (`--task-search-path` is the project,
    the storage folders are inside it)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(toy_task_dir / "evo_toy", root / "evo_toy")
    (root / "runs").mkdir()
    return root


@pytest.fixture(scope="module")
def genome_file(fam, project) -> Path:
    return write_genome(project / "genome.yml", {
        "models": [str(fam["c0"]), str(fam["c1"])], "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]), "layer_granularity": 2, "filters": ["mlp"]}, limit=16)


def args_for(genome_file, project, name, *extra, fevals=FEVALS):
    return [genome_file, "--storage-path", project / "runs" / name, "--task-search-path",
            project, "--max-fevals", fevals, *COMMON, *extra]


# --- no Ray needed: refused in a second ----------------------------------------------------------
def test_more_workers_than_the_machine_has_is_refused_before_ray_starts(genome_file, project):
    import ray

    from evolve.placement import local_cpus

    assert not ray.is_initialized()
    storage = project / "runs" / "too-many"
    n = local_cpus() + 1
    code, _, err = evolve(genome_file, "--storage-path", storage, "--workers", n, "-q")
    assert code == 2
    line = one_error_line(err)
    assert f"--workers: {n} worker(s) × 1 CPU need {n} CPU but this machine has {n - 1}" in line
    # GPUs count too (--device cpu: GPU slots reserved, work on the CPU, as on a cluster)
    code, _, err = evolve(genome_file, "--storage-path", storage, "--workers", 2,
                          "--gpus-per-worker", 1, "--device", "cpu", "-q")
    assert code == 2 and "× 1 GPU need 2 GPU but this machine has" in one_error_line(err)
    assert not ray.is_initialized()      # nothing was started ...
    assert not storage.exists()          # ... and nothing written


@pytest.mark.parametrize("case", ["parent_is_a_file", "under_proc", "resume_nothing"])
def test_storage_path_problems_are_one_line(genome_file, project, tmp_path, case):
    extra = []
    if case == "parent_is_a_file":
        (tmp_path / "notes.txt").write_text("x")
        storage, expect = tmp_path / "notes.txt" / "run", "is a file, not a folder"
    elif case == "under_proc":
        storage, expect = Path("/proc/evomerge-run"), "cannot create '/proc/evomerge-run'"
    else:
        storage, expect = tmp_path / "typo", "--resume: there is no run to resume in"
        extra = ["--resume"]
    code, _, err = evolve(genome_file, "--storage-path", storage, "--task-search-path", project,
                          *extra, "-q")
    assert code == 2
    assert expect in one_error_line(err)
    if case != "under_proc":
        assert not storage.exists()


def test_missing_evolve_extra_is_one_line_naming_the_install(genome_file, tmp_path):
    """Without the `evolve` extra (ray and cma blocked from importing, as if not installed)."""
    code = ("import sys\n"
            "sys.modules['ray'] = None\nsys.modules['cma'] = None\n"
            "from evolve.cli import main\nmain()")
    done = subprocess.run([sys.executable, "-c", code, str(genome_file), "--storage-path",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "cma, ray are not installed" in line and "pip install 'evomerge[evolve]'" in line
    assert not (tmp_path / "run").exists()


def _closure(requirements: list[str], seen: set[str]) -> set[str]:
    """Installed distributions a requirement list pulls in, transitively, extras included."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for text in requirements:
        req = Requirement(text)
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        wanted = []
        for sub in dist.requires or []:
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in
                                       ("", *req.extras)):
                wanted.append(sub)
        _closure(wanted, seen)
    return {name for name, _ in seen}


def test_evolve_extra_installs_every_module_a_search_imports():
    """pyproject's `evolve` extra (with the base dependencies), resolved through the installed
    distributions' own requirements, must cover every distribution that the driver's and the
    workers' imports load. A fresh venv would take minutes; this resolves the same requirement
    graph from the metadata already installed, offline, in seconds. (It cannot see a dependency
    that is missing from this venv too: those fail every other test here.)"""
    import importlib.metadata as md
    import tomllib

    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    allowed = _closure(project["dependencies"] + project["optional-dependencies"]["evolve"],
                       set())
    probe = ("import sys, json\n"
             "import evolve.cli, evolve.run, evolve.search, evolve.workers, evolve.fitness\n"
             "import evolve.tasks, evolve.report, evolve.tracking, merge.engine\n"
             "import cma, ray, wandb, matplotlib.pyplot, datasets\n"
             "import lm_eval.evaluator, lm_eval.tasks, lm_eval.models.huggingface\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    top = json.loads(done.stdout.strip().splitlines()[-1])
    owners = md.packages_distributions()
    used = {canonicalize_name(d) for m in top for d in owners.get(m, [])}
    ours = {"evomerge"}
    missing = sorted(used - allowed - ours)
    assert "accelerate" in used and not missing, missing


# --- the uninterrupted run every fault is compared with ------------------------------------------
@pytest.fixture(scope="module")
def reference(ray_session, fam, project, genome_file):
    """First a start that fails (an input's weights cut short: the workers cannot load it),
    which must leave nothing behind; then the same command, which must simply run."""
    weights = fam["c1"] / "model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(saved[: len(saved) // 2])
    try:
        failed = evolve(*args_for(genome_file, project, "reference"))
    finally:
        weights.write_bytes(saved)
    code, out, err = evolve(*args_for(genome_file, project, "reference"))
    storage = project / "runs" / "reference"
    return {"failed": failed, "code": code, "out": out, "err": err, "storage": storage,
            "records": records(storage) if code == 0 else None}


def test_failed_start_never_blocks_the_next_and_the_reference_run_completes(reference, fam):
    code, _, err = reference["failed"]
    assert code == 2 and "a worker failed to start" in last_error_line(err)
    assert reference["code"] == 0, reference["err"]       # not "already holds a run"
    storage = reference["storage"]
    assert len(reference["records"]) == FEVALS
    assert all(e is None for _, _, _, e in reference["records"].values())
    # the storage folder sits inside the task search path: the mirror left itself out
    mirror = next(p for p in (storage / "tasks").iterdir() if (p / "evo_toy").is_dir())
    assert sorted(p.name for p in mirror.iterdir()) == ["evo_toy", "genome.yml", "runs"]
    assert list((mirror / "runs").iterdir()) == []
    assert not (storage / "wandb").exists()                  # W&B off unless --wandb
    assert (storage / "final_model").resolve() == (storage / "best_model").resolve()
    cfg = json.loads((storage / "best_model" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "bfloat16"  # the reference's dtype
    assert "apply_chat_template is off" in reference["err"]
    # every candidate was merged (into the workers' live bf16 model) in the dtype written out
    first = json.loads((storage / "history.jsonl").read_text().splitlines()[0])
    assert first["config"]["dtype"] == "bfloat16"


def test_chat_template_default_follows_the_evaluated_tokenizer(fam, tmp_path):
    from evolve.run import chat_template_source, has_chat_template

    assert not has_chat_template(str(fam["base"]))       # the tiny tokenizer has none
    folder = tmp_path / "chat"
    shutil.copytree(fam["base"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert has_chat_template(str(folder))
    models = [{"model": "a"}, {"model": "b"}]
    assert chat_template_source({"models": models}) == "a"
    assert chat_template_source({"models": models, "base_model": "base"}) == "base"
    assert chat_template_source({"models": models, "base_model": "base",
                                 "tokenizer_source": "b"}) == "b"
    assert chat_template_source({"models": models, "chat_template": "chatml"}) is True


def test_task_folder_inside_the_storage_mirror_is_refused_not_deleted(
        reference, genome_file, project, tmp_path):
    storage = tmp_path / "run"
    shutil.copytree(reference["storage"], storage, symlinks=True)
    mine = storage / "tasks" / "mine"
    mine.mkdir()
    (mine / "keep.yaml").write_text("task: mine\n")
    code, _, err = evolve(genome_file, "--storage-path", storage, "--task-search-path", mine,
                          "--max-fevals", FEVALS, *COMMON, "--resume")
    assert code == 2
    assert "--task-search-path: " in one_error_line(err) and "task mirror" in err
    assert (mine / "keep.yaml").read_text() == "task: mine\n"


def _assert_same_evaluations(got: dict, want: dict, lost=()):
    for key, value in got.items():
        if key in want:
            assert value == want[key], key
    assert set(want) - set(lost) <= set(got), sorted(set(want) - set(got))


def test_history_faults_keep_every_readable_record_and_resume_exactly(
        reference, genome_file, project):
    want = reference["records"]
    runs = project / "runs"
    code, _, err = evolve(*args_for(genome_file, project, "faults", "--no-merge-best",
                                    fevals=10))
    assert code == 0, err
    before = records(runs / "faults")
    assert len(before) == 10                       # generation 2 in flight: 2 of 4 done
    assert all(before[k] == want[k] for k in before)
    for name in ("damaged", "emptied"):
        shutil.copytree(runs / "faults", runs / name)
    resume = ["--resume", "--no-merge-best"]

    # 1. a damaged middle line, and a last line torn by a kill: the damage is named and nothing
    # changes, until --repair-history keeps every readable record; the torn line is dropped
    history = runs / "damaged" / "history.jsonl"
    lines = history.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"generation": 0, "ind\x00\x00garbage\n'
    history.write_bytes(b"".join(lines)[:-25])
    damaged = history.read_bytes()
    code, _, err = evolve(*args_for(genome_file, project, "damaged", *resume))
    assert code == 2
    line = one_error_line(err)
    assert "history.jsonl line 3 is damaged" in line and "--repair-history" in line
    assert history.read_bytes() == damaged
    code, _, err = evolve(*args_for(genome_file, project, "damaged", *resume, "--repair-history"))
    assert code == 0, err
    assert "moved 2 damaged line(s) of history.jsonl (line 3, 10)" in err
    side = (runs / "damaged" / "history.jsonl.damaged").read_bytes()
    assert lines[2] in side and lines[9][:-25] in side
    got = records(runs / "damaged")
    assert (0, 2) not in got and (2, 1) in got and len(got) == FEVALS
    _assert_same_evaluations(got, want, lost={(0, 2)})

    # 2. an emptied history next to the checkpoint: refused; confirmed, the best is kept
    (runs / "emptied" / "history.jsonl").write_bytes(b"")
    code, _, err = evolve(*args_for(genome_file, project, "emptied", *resume))
    assert code == 2 and "history.jsonl is empty but the checkpoint counted 8" in \
        one_error_line(err)
    code, _, err = evolve(*args_for(genome_file, project, "emptied", *resume, "--repair-history"))
    assert code == 0, err
    after = records(runs / "emptied")
    _assert_same_evaluations(after, want, lost=set(before))
    ordered = list(before.items()) + [(k, v) for k, v in after.items()]
    top = max(v[2] for _, v in ordered)
    first = next(k for k, v in ordered if v[2] == top)
    assert best_header(runs / "emptied") == (pytest.approx(top, abs=1e-6), *first)



def test_only_a_torn_last_line_is_dropped_and_said(tmp_path):
    from evolve.storage import RunStore

    store = RunStore(tmp_path)
    good = [json.dumps({"generation": 0, "index": i, "genome": [0.5]}) + "\n" for i in range(3)]
    store.history.write_text("".join(good) + '{"generation": 0, "index": 3, "gen')
    notes = []
    assert [r["index"] for r in store.read_history(log=notes.append)] == [0, 1, 2]
    assert store.history.read_text() == "".join(good)
    assert notes == ["note: the last line of history.jsonl (line 4) was cut short by a kill; "
                     "dropped, its candidate is evaluated again"]
    # a complete last record without its newline is kept, and the newline restored
    store.history.write_text("".join(good) + good[0].strip())
    assert len(store.read_history()) == 4 and store.history.read_text().endswith("}\n")
    # anything else that is not a record is damage, wherever it is
    store.history.write_text(good[0] + "[1, 2]\n" + good[1])
    with pytest.raises(Exception, match="line 2 is damaged"):
        store.read_history()


def test_input_model_removed_mid_search_is_named_and_the_run_resumes(
        reference, fam, genome_file, project):
    storage = project / "runs" / "inputs"
    folder, away = fam["c1"], fam["c1"].with_name("c1.away")
    moved = threading.Event()

    def remove_when_running():
        history = storage / "history.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if history.exists() and len(history.read_bytes().splitlines()) >= 2:
                folder.rename(away)
                moved.set()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=remove_when_running, daemon=True)
    thread.start()
    try:
        code, _, err = evolve(*args_for(genome_file, project, "inputs", "--no-merge-best"))
        thread.join()
    finally:
        if moved.is_set():
            away.rename(folder)
    assert moved.is_set()
    assert code == 2
    line = last_error_line(err)
    assert f"genome.models[1]: the input model '{folder}' was removed during the search" in line
    assert "--resume" in line
    assert len(records(storage)) < FEVALS
    code, _, err = evolve(*args_for(genome_file, project, "inputs", "--no-merge-best",
                                    "--resume"))
    assert code == 0, err
    assert records(storage) == reference["records"]


@pytest.fixture
def short_tmp():
    path = tempfile.mkdtemp(prefix="evr-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def _end_processes_naming(folder: Path, timeout: float = 30) -> None:
    """SIGKILL every process whose command line names `folder` (the Ray daemons of a killed
    test driver that outlived its process group), and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if str(folder).encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _run_until_signal(cmd, env, history: Path, at: int, sig) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if history.exists() and len(history.read_bytes().splitlines()) >= at:
                os.kill(proc.pid, sig)           # the driver alone, as a scheduler does
                break
            time.sleep(0.02)
        out, err = proc.communicate(timeout=180)
    finally:
        # The driver's Ray processes share its session: end exactly those (after SIGKILL, or
        # if anything went wrong).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_signals_stop_cleanly_say_how_to_continue_and_resume_exactly(
        reference, genome_file, project, short_tmp):
    """SIGTERM (a scheduler, `ray job stop`) and SIGINT (Ctrl-C) to the driver alone: a clean
    stop, how to continue, no temp folder of ours left. SIGKILL cannot be handled: its Ray
    folder is removed by the next run's start. Each time --resume continues the same search."""
    from evolve.placement import sweep_stale_ray_dirs

    storage = project / "runs" / "signals"
    history = storage / "history.jsonl"
    cmd = [sys.executable, "-c", "from evolve.cli import main; main()",
           *map(str, args_for(genome_file, project, "signals", "--no-merge-best"))]
    env = {**os.environ, "TMPDIR": str(short_tmp), "WANDB_MODE": "disabled"}
    seen, kept = 0, []
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)):
        done = _run_until_signal(cmd + (["--resume"] if seen else []), env, history,
                                 seen + 3, sig)
        assert done.returncode == code, done.stderr[-3000:]
        now = records(storage)
        assert seen < len(now) < FEVALS
        assert all(now[k] == v for k, v in kept)            # nothing rewritten
        seen, kept = len(now), list(now.items())
        if sig == signal.SIGKILL:
            assert list(short_tmp.glob("evomerge-ray-*"))   # what kill -9 leaves behind ...
            _end_processes_naming(short_tmp)
            sweep_stale_ray_dirs([str(short_tmp)], min_age=0)
            assert not list(short_tmp.glob("evomerge-ray-*"))   # ... the next start removes
            break
        name = signal.Signals(sig).name
        assert f"stopped by {name} after {seen}/{FEVALS} evaluations" in done.stderr
        assert "--resume" in done.stderr
        for bad in ("Traceback", "SIGABRT", "Aborted", "*** SIG", "core dumped"):
            assert bad not in done.stderr, done.stderr[-3000:]
        assert not list(short_tmp.glob("evomerge-*")), list(short_tmp.iterdir())
    code, _, err = evolve(*args_for(genome_file, project, "signals", "--no-merge-best",
                                    "--resume"))
    assert code == 0, err
    assert f"{seen}/{FEVALS} evaluations done" in err
    assert records(storage) == reference["records"]


# --- a reference-format genome that runs for real (all are decoded in test_evolve_genome) ----
@pytest.mark.parametrize("name", ["slerp_three_models.yml"])
def test_reference_genomes_run(ray_session, fam, project, name, tmp_path):
    from test_evolve_genome import reference_genome

    path = reference_genome(name, {"BASE": fam["base"], "MODEL_A": fam["c0"],
                                   "MODEL_B": fam["c1"], "MODEL_C": fam["base"]}, tmp_path)
    storage = tmp_path / "run"
    code, out, err = evolve(path, "--storage-path", storage, "--task-search-path", project,
                            "--max-fevals", 4, "--force-population-size", 2, "--no-merge-best",
                            "--strategy", "pool", "-q")
    assert code == 0, err
    got = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert len(got) == 4 and all(r["error"] is None for r in got), got
    cfg = got[-1]["config"]
    assert cfg["dtype"] == "bfloat16"
    if name.startswith("slerp"):
        assert cfg["merge_method"] == "nuslerp"
        assert all(len(s["sources"]) == 2 for s in cfg["slices"])
    else:
        assert cfg["parameters"]["normalize"] is True
    assert yaml.safe_load((storage / "best_config.yaml").read_text())["dtype"] == "bfloat16"
