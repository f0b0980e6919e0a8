"""mergekit-evolve on a real multi-node Ray cluster, on this machine: a head and a second node, each
a `ray start` on 127.0.0.1 with its own ports, temp dir and process session, token authentication
on, logical GPUs from `--num-gpus`. Searches are submitted with scripts/submit_ray_job.sh (i.e.
`ray job submit`) or run as a driver with `--ray-address`. The cluster is torn down by killing
exactly the processes of its nodes' sessions (never `ray stop`: that ends every Ray on the machine).

Layout: the head has 2 CPUs and no GPU (it runs GCS, the dashboard and the job drivers); `node2`
has 2 CPUs and 1 logical GPU. Workers asking for GPUs therefore all land on node2; CPU-only
workers are spread over both nodes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "scripts" / "submit_ray_job.sh"
VENV_BIN = Path(sys.executable).parent
TIMINGS: dict[str, float] = {}


# --- the cluster ---------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_range(size: int, avoid: set[int]) -> int:
    """The first port of `size` consecutive free ones that are none of `avoid` (ports already
    given to this cluster but not listening yet: Ray refuses a node whose ports overlap)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - size)
        if avoid & set(range(base, base + size)):
            continue
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (int(fields[1]), int(fields[3]))
    return out


class RayCluster:
    """Nodes started with `ray start` in their own sessions: a node's processes are those of its
    session plus their descendants (job drivers start sessions of their own)."""

    def __init__(self, root: Path):
        self.root = root
        token = root / "auth_token"
        token.write_text(hashlib.sha256(os.urandom(32)).hexdigest())
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # Explicit on every node and client: with RAY_AUTH_MODE unset, Ray >= 2.59 turns
            # token auth on for `ray start --head` when ~/.ray/auth_token exists, but not for
            # `ray start --address` nor `ray.init(address=...)`, which then fail after ~20 s.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            # A lost node is noticed in ~2 s instead of ~30 s.
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_API_SERVER_ADDRESS", None)
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.used = {self.gcs_port, self.dashboard_port, self.client_port}
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.jobs_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.sessions: dict[str, int] = {}

    def start(self, name: str, num_cpus: int, num_gpus: int) -> None:
        # One block per node: 100 worker ports, then its six named ports, clear of every port
        # this cluster uses already.
        block = _free_port_range(106, self.used)
        self.used |= set(range(block, block + 106))
        workers = block
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = range(
            block + 100, block + 106)
        args = ["ray", "start", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                "--num-gpus", str(num_gpus), "--disable-usage-stats",
                # one temp dir per node: nodes sharing one would share (and delete each other's)
                # runtime_resources/working_dir_files
                "--temp-dir", str(self.root / name),
                "--dashboard-agent-listen-port", str(agent),
                "--dashboard-agent-grpc-port", str(agent_grpc),
                "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
                "--node-manager-port", str(node_manager),
                "--object-manager-port", str(object_manager),
                "--min-worker-port", str(workers), "--max-worker-port", str(workers + 99)]
        if not self.sessions:
            args += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(self.client_port)]
        else:
            args += ["--address", self.address]
        proc = subprocess.Popen(args, env=self.env, start_new_session=True, cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sessions[name] = proc.pid      # its daemons keep the session of `ray start`
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start ({name}) failed:\n{out[-3000:]}"

    def processes(self, names) -> list[int]:
        procs = _procs()
        sids = {self.sessions[n] for n in names}
        found = {pid for pid, (_, sid) in procs.items() if sid in sids}
        while True:   # and their descendants in other sessions (job drivers)
            more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
            if not more:
                return sorted(found)
            found |= more

    def kill(self, names) -> None:
        pids = self.processes(names)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
            time.sleep(0.05)
        for name in names:
            self.sessions.pop(name, None)

    def alive_nodes(self) -> int:
        out = subprocess.run([sys.executable, "-c", (
            "import ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))") % self.address],
            env=self.env, capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        self.kill(list(self.sessions))


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2]


@pytest.fixture(scope="module")
def cluster():
    # Unix socket paths are limited to ~107 bytes and Ray nests ~70 under a node's temp dir: a
    # short folder of our own under /tmp, removed at the end with everything in it.
    root = Path(tempfile.mkdtemp(prefix="evc-", dir="/tmp"))
    c = RayCluster(root)
    try:
        t0 = time.monotonic()
        c.start("head", num_cpus=2, num_gpus=0)
        TIMINGS["head start"] = time.monotonic() - t0
        t0 = time.monotonic()
        c.start("node2", num_cpus=2, num_gpus=1)
        TIMINGS["second node start"] = time.monotonic() - t0
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))


@pytest.fixture
def both_nodes(cluster):
    if "node2" not in cluster.sessions:
        cluster.start("node2", num_cpus=2, num_gpus=1)
    return cluster


@pytest.fixture
def head_only(cluster):
    if "node2" in cluster.sessions:
        cluster.kill(["node2"])
    return cluster


# --- helpers -------------------------------------------------------------------------------------
def genome_file(family, path: Path, limit: int = 8) -> Path:
    from conftest import write_genome

    g = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "task_arithmetic",
         "base_model": str(family["base"]), "layer_granularity": 2}
    return write_genome(path, g, limit=limit)


def submit(cluster, *args, env_extra=None, timeout=150) -> subprocess.CompletedProcess:
    env = {**cluster.env, **(env_extra or {})}
    return subprocess.run([str(SUBMIT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cluster.root)


def driver(cluster, *args, timeout=120) -> subprocess.CompletedProcess:
    """mergekit-evolve run by hand against the cluster (`--ray-address host:port`)."""
    return subprocess.run([sys.executable, "-m", "evolve", *map(str, args), "-q"],
                          env=cluster.env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def history(storage: Path) -> list[dict]:
    return [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --- tests ---------------------------------------------------------------------------------------
def test_submitted_job_searches_on_the_cluster_and_writes_every_output(
        both_nodes, family, toy_task_dir, tmp_path):
    """scripts/submit_ray_job.sh → `ray job submit` → `python -m evolve --ray-address auto` on the
    head; two workers with half a logical GPU each share node2's GPU; outputs in shared storage."""
    cluster = both_nodes
    genome = genome_file(family, tmp_path / "g.yaml")
    storage = tmp_path / "shared" / "run"
    t0 = time.monotonic()
    done = submit(cluster, "--address", cluster.jobs_url, "--submission-id", "evo-submit", "--",
                  genome, "--storage-path", storage, "--task-search-path", toy_task_dir,
                  "--workers", 2, "--popsize", 2, "--max-fevals", 4, "--seed", 1,
                  "--gpus-per-worker", 0.5, "--device", "cpu", "--no-wandb")
    TIMINGS["submitted job (4 evaluations)"] = time.monotonic() - t0
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "Job 'evo-submit' succeeded" in log
    assert "stopped (max-fevals) after 4 evaluations, 2 generation(s)" in log
    # both workers on node2 (the only node with a GPU), sharing its GPU 0
    placed = next(line for line in log.splitlines() if "workers ready" in line)
    assert "placed on 1 node(s)" in placed and "×2 (GPU 0, 0)" in placed, placed

    records = history(storage)
    assert sorted((r["generation"], r["index"]) for r in records) == [(0, 0), (0, 1), (1, 0),
                                                                       (1, 1)]
    assert all(r["error"] is None and r["fitness"] is not None for r in records)
    assert len({r["worker"] for r in records}) == 2
    for name in ("best_config.yaml", "report.png", "report.html", "run.json", "checkpoint.pkl"):
        assert (storage / name).stat().st_size > 0, name
    assert (storage / "best_model" / "config.json").is_file()
    assert "merge_method: task_arithmetic" in (storage / "best_config.yaml").read_text()


def test_fractional_gpu_requests_that_do_not_fit_fail_before_any_worker_starts(
        both_nodes, family, toy_task_dir, tmp_path):
    """node2's one logical GPU holds two 0.5-GPU workers (previous test), not three: one line,
    exit 2, before any worker starts, nothing written."""
    cluster = both_nodes
    genome = genome_file(family, tmp_path / "g.yaml")
    storage = tmp_path / "run"
    t0 = time.monotonic()
    done = driver(cluster, genome, "--storage-path", storage, "--task-search-path", toy_task_dir,
                  "--ray-address", cluster.address, "--device", "cpu", "--cpus-per-worker", 0.5,
                  "--workers", 3, "--gpus-per-worker", 0.5)
    TIMINGS["driver refused (3 × 0.5 GPU on 1)"] = time.monotonic() - t0
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("--workers: 3 worker(s) × 0.5 GPU need 1.5 GPU but the Ray cluster has 1; lower "
            "--workers or --gpus-per-worker") in one_error_line(done.stderr)
    assert not storage.exists()


def test_placement_check_counts_per_node_capacity():
    """Totals can suffice while no node can hold the workers (Ray would wait forever)."""
    from evolve.workers import _workers_on_node

    assert _workers_on_node({"CPU": 2, "GPU": 1}, cpus=1, gpus=0.5) == 2
    assert _workers_on_node({"CPU": 8, "GPU": 2}, cpus=1, gpus=0.5) == 4
    assert _workers_on_node({"CPU": 8, "GPU": 2}, cpus=1, gpus=0.6) == 2     # one per GPU
    assert _workers_on_node({"CPU": 8, "GPU": 4}, cpus=1, gpus=2) == 2
    assert _workers_on_node({"CPU": 1, "GPU": 4}, cpus=1, gpus=1) == 1       # CPU-bound
    assert _workers_on_node({"CPU": 4}, cpus=1, gpus=0.5) == 0


def test_gpu_slots_with_cpu_merging_only_when_asked_for_explicitly():
    """`--device cpu --gpus-per-worker 0.5`: Ray reserves half a GPU per worker, the merge and the
    scoring run on the CPU (what the tests above do with logical GPUs). GPU indices inside a
    worker are its own: cuda:1 does not exist in a one-GPU worker."""
    from evolve.cli import Options, _device_and_gpus
    from merge.errors import EvomergeError

    def settle(**kw):
        return _device_and_gpus(Options(genome="g.yaml", ray_address="h:1", **kw))

    assert settle(device="cpu", gpus_per_worker=0.5) == ("cpu", 0.5)
    assert settle(gpus_per_worker=0.5) == ("cuda", 0.5)
    assert settle(device="cuda") == ("cuda", 1.0)
    assert settle(device="cuda:1", gpus_per_worker=2) == ("cuda:1", 2)
    with pytest.raises(EvomergeError, match="--device: cuda:1 does not exist inside a worker"):
        settle(device="cuda:1", gpus_per_worker=1)
    with pytest.raises(EvomergeError, match="--device: cuda needs --gpus-per-worker > 0"):
        settle(device="cuda", gpus_per_worker=0)


def test_a_node_lost_mid_evaluation_gets_its_candidate_retried_and_the_search_finishes(
        both_nodes, family, toy_task_dir, tmp_path):
    """CPU workers spread over both nodes; the one on node2 takes node2 down (SIGKILL to its
    raylet) in the middle of an evaluation. Its candidate is retried on the head's worker, a fresh
    worker replaces it, and every candidate is scored."""
    cluster = both_nodes
    genome = genome_file(family, tmp_path / "g.yaml")
    storage = tmp_path / "shared" / "run"
    marker = tmp_path / "node2-died"
    t0 = time.monotonic()
    done = submit(cluster, "--address", cluster.jobs_url,
                  "--env", f"EVOMERGE_TEST_WORKER_EXIT_ONCE=node:{marker}", "--",
                  genome, "--storage-path", storage, "--task-search-path", toy_task_dir,
                  "--workers", 2, "--popsize", 2, "--max-fevals", 6, "--no-wandb",
                  "--no-merge-best")
    TIMINGS["job with a lost node (6 evaluations)"] = time.monotonic() - t0
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "placed on 2 node(s)" in log
    raylet = int(marker.read_text())                  # a worker on node2 took it down
    assert not Path(f"/proc/{raylet}").exists() or _state(raylet) == "Z"
    assert "a worker died while evaluating candidate" in log
    records = history(storage)
    assert len(records) == 6 and all(r["fitness"] is not None for r in records)
    assert len({(r["generation"], r["index"]) for r in records}) == 6
    assert [r["attempt"] for r in records].count(2) == 1
    assert cluster.alive_nodes() == 1
    cluster.kill(["node2"])          # what is left of it (its log monitor, agents)


def test_gpu_request_on_a_cluster_without_gpus_fails_in_one_line_and_touches_nothing(
        head_only, family, toy_task_dir, tmp_path):
    cluster = head_only
    genome = genome_file(family, tmp_path / "g.yaml")
    # an existing run, resumed with a GPU request: refused, the folder left exactly as it was
    storage = tmp_path / "run"
    done = driver(cluster, genome, "--storage-path", storage, "--task-search-path", toy_task_dir,
                  "--ray-address", cluster.address, "--workers", 1, "--popsize", 2,
                  "--max-fevals", 2, "--no-wandb", "--no-merge-best")
    assert done.returncode == 0, done.stderr[-3000:]
    before = snapshot(storage)
    for path, extra in ((storage, ["--resume", "--max-fevals", 4]), (tmp_path / "new", [])):
        t0 = time.monotonic()
        done = driver(cluster, genome, "--storage-path", path, "--task-search-path",
                      toy_task_dir, "--ray-address", cluster.address, "--workers", 2,
                      "--gpus-per-worker", 0.5, *extra)
        TIMINGS.setdefault("driver refused (no GPU)", time.monotonic() - t0)
        assert done.returncode == 2, done.stderr[-3000:]
        line = one_error_line(done.stderr)
        assert ("--workers: 2 worker(s) × 0.5 GPU need 1 GPU but the Ray cluster has 0 (no node "
                "has a GPU); use --gpus-per-worker 0 (and --device cpu), or add GPU nodes") in line
    assert snapshot(storage) == before
    assert not (tmp_path / "new").exists()


def test_killed_driver_is_resumed_from_shared_storage_by_a_new_job(
        cluster, family, toy_task_dir, tmp_path):
    """The job's driver is SIGKILLed mid-run (its workers go with it); the same search submitted
    again with --resume finishes it, every evaluation exactly once."""
    genome = genome_file(family, tmp_path / "g.yaml", limit=40)
    storage = tmp_path / "shared" / "run"
    args = [genome, "--storage-path", storage, "--task-search-path", toy_task_dir,
            "--workers", 1, "--popsize", 2, "--max-fevals", 24, "--no-wandb", "--no-merge-best"]
    first = submit(cluster, "--address", cluster.jobs_url, "--submission-id", "evo-first",
                   "--no-wait", "--", *args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = storage / "history.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if lines.exists() and len(lines.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    # the driver (and the shell Ray may run it in)
    drivers = [pid for pid in _procs() if str(storage).encode() in _cmdline(pid)
               and b"-m\x00evolve" in _cmdline(pid)]
    assert drivers
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    for pid in drivers:
        _wait_gone(pid)
    before = history(storage)
    assert 3 <= len(before) < 24

    t0 = time.monotonic()
    done = submit(cluster, "--address", cluster.jobs_url, "--", *args, "--resume")
    TIMINGS["resumed job"] = time.monotonic() - t0
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert f"{len(before)}/24 evaluations done" in log
    after = history(storage)
    keys = [(r["generation"], r["index"]) for r in after]
    assert len(after) == 24 and len(set(keys)) == 24
    assert after[:len(before)] == before


def test_bad_addresses_and_a_missing_token_fail_in_one_line(cluster, family, toy_task_dir, tmp_path):
    genome = genome_file(family, tmp_path / "g.yaml")
    storage = tmp_path / "run"
    nobody = _free_ports(1)[0]
    env = {k: v for k, v in cluster.env.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    cases = [
        ([], "error: --address: missing; give the Ray jobs address of the head node"),
        (["--address", f"http://127.0.0.1:{nobody}"],
         f"error: --address: nothing answers at 127.0.0.1:{nobody}; start the head node"),
    ]
    for address, expect in cases:
        t0 = time.monotonic()
        done = subprocess.run([str(SUBMIT), *address, "--", str(genome), "--storage-path",
                               str(storage)], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and time.monotonic() - t0 < 10
        assert one_error_line(done.stderr).startswith(expect), done.stderr
    done = subprocess.run([str(SUBMIT), "--address", cluster.jobs_url, "--", str(genome),
                           "--storage-path", "runs/x"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "--storage-path: 'runs/x' is relative" in one_error_line(done.stderr)

    t0 = time.monotonic()
    done = driver(cluster, genome, "--storage-path", storage, "--task-search-path", toy_task_dir,
                  "--ray-address", f"127.0.0.1:{nobody}")
    assert done.returncode == 2 and time.monotonic() - t0 < 30
    assert f"--ray-address: nothing answers at 127.0.0.1:{nobody}" in one_error_line(done.stderr)
    assert not storage.exists()

    # the right address without the cluster's token: refused in one line, not a C++ log flood
    # (Ray retries for ~20 s before it gives up)
    no_token = {**cluster.env, "RAY_AUTH_MODE": "disabled"}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "evolve", str(genome), "--storage-path",
                           str(storage), "--task-search-path", str(toy_task_dir),
                           "--ray-address", cluster.address, "-q"],
                          env=no_token, capture_output=True, text=True, timeout=120, cwd=REPO)
    TIMINGS["driver refused (no token)"] = time.monotonic() - t0
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "rejected this driver's authentication token; export RAY_AUTH_MODE=token" in line
    assert not storage.exists()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
        time.sleep(0.05)
