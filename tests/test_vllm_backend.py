"""`--backend vllm`, everything around the engine.

vLLM cannot be installed or run on the machines these tests run on (no GPU; vllm pins its own CUDA
torch and an older transformers), so the two `vllm.LLM` methods the backend calls —
`collective_rpc` and `reset_prefix_cache` — are played by a small recording engine, and vLLM's
`model.load_weights` by a loader that copies by Hugging Face name into a REAL transformers model.
These test doubles exist only because the real engine cannot run here; docs/vllm.md says what was
and was not exercised. Everything else (the merge engine, safetensors encoding, the extension
class, lm-eval tasks and scoring, the CLI) is the real code.
"""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from evolve.vllm_backend import (EXTENSION, SWAP_METHOD, VllmBackend, VllmSettings,
                                 check_resources, weight_swap)
from evolve.vllm_ext import WeightSwap
from merge.config import MergeConfig
from merge.engine import InMemoryMerger, MergeOptions
from merge.errors import ConfigError, EvomergeError

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Stand-ins for vLLM (see the module docstring)
# ---------------------------------------------------------------------------------------------
class HFNameLoader:
    """Plays vLLM's `model_runner.model`: `load_weights` takes (HF name, tensor) pairs and copies
    them into a real transformers model. Unknown names fail, as they do in vLLM."""

    def __init__(self, model):
        self.model = model
        self.loaded: list[str] = []

    def load_weights(self, weights):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                assert name in params, f"no parameter {name}"
                params[name].copy_(tensor)
                self.loaded.append(name)
        return {name for name, _ in weights}


class StandInWorker(WeightSwap):
    """A vLLM GPU worker with our extension mixed in (vLLM adds it to the worker's bases)."""

    def __init__(self, model):
        self.model_runner = types.SimpleNamespace(model=HFNameLoader(model))


class StandInEngine:
    """Plays `vllm.LLM`: `collective_rpc` runs the method on every worker (one per tensor-parallel
    rank) after a pickle round trip of its arguments, as a multiprocess engine does;
    `reset_prefix_cache` is counted. `events` keeps the order of both."""

    def __init__(self, workers, fail_on_rpc: int | None = None, reset_answer=True):
        self.workers = workers
        self.events: list[tuple] = []
        self.fail_on_rpc = fail_on_rpc
        self.reset_answer = reset_answer

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        args = pickle.loads(pickle.dumps(args))
        self.events.append(("rpc", method, len(args[0])))
        if self.fail_on_rpc is not None and self.rpcs == self.fail_on_rpc:
            raise RuntimeError("worker died")
        return [getattr(w, method)(*args, **(kwargs or {})) for w in self.workers]

    def reset_prefix_cache(self):
        self.events.append(("reset",))
        return self.reset_answer

    @property
    def rpcs(self) -> int:
        return sum(e[0] == "rpc" for e in self.events)

    @property
    def resets(self) -> int:
        return sum(e[0] == "reset" for e in self.events)


def merge_cfg(family, w0: float, w1: float) -> MergeConfig:
    return MergeConfig.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(family["base"]),
        "models": [{"model": str(family["c0"]), "parameters": {"weight": w0}},
                   {"model": str(family["c1"]), "parameters": {"weight": w1}}]})


def engine_for(config: MergeConfig, tp: int = 1):
    """Stand-in engine whose `tp` workers each hold a real HF model of `config`'s layout, loaded
    with `config`'s merge (as vLLM would be, from the initial merged folder)."""
    model = InMemoryMerger(MergeOptions(random_seed=3)).build_model(config)
    workers = [StandInWorker(copy.deepcopy(model)) for _ in range(tp)]
    return StandInEngine(workers), workers


def params_of(worker) -> dict[str, torch.Tensor]:
    return dict(worker.model_runner.model.model.state_dict())


# ---------------------------------------------------------------------------------------------
# The weight swap
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["family", "family_bf16"])
def test_swap_loads_the_merged_candidate_bit_for_bit_on_every_rank(which, request):
    family = request.getfixturevalue(which)
    initial, candidate = merge_cfg(family, 0.5, 0.5), merge_cfg(family, 0.9, -0.3)
    llm, workers = engine_for(initial, tp=2)
    expected = InMemoryMerger(MergeOptions(random_seed=3)).merge_state(candidate)
    before = params_of(workers[0])
    assert any(not torch.equal(before[k], v) for k, v in expected.items())   # a real change

    backend = VllmBackend(InMemoryMerger(MergeOptions(random_seed=3)), llm, chunk_bytes=20_000)
    backend.load(candidate)

    for w in workers:                           # every tensor-parallel rank got every tensor
        got = params_of(w)
        assert sorted(w.model_runner.model.loaded) == sorted(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype
            assert torch.equal(got[name], tensor), name
    assert llm.rpcs > 1                          # chunked: several calls, one reset at the end
    assert llm.events[-1] == ("reset",) and llm.resets == 1
    assert {e[1] for e in llm.events if e[0] == "rpc"} == {SWAP_METHOD}


def test_streamed_tensors_are_the_checkpoint_names_with_tied_embeddings(tmp_path):
    """A tied model has no lm_head tensor in its checkpoint; the swap sends none either (vLLM
    ties the head itself), and the HF model's head follows the merged embedding."""
    import tinymodels

    family = tinymodels.build_family(tmp_path, children=2, tie_word_embeddings=True)
    checkpoint_names = set(tinymodels.load_state(family["base"]))
    assert "lm_head.weight" not in checkpoint_names

    candidate = merge_cfg(family, 0.7, 0.4)
    llm, [worker] = engine_for(merge_cfg(family, 0.5, 0.5))
    VllmBackend(InMemoryMerger(MergeOptions(random_seed=3)), llm, chunk_bytes=1 << 30).load(
        candidate)

    loaded = worker.model_runner.model.loaded
    assert sorted(loaded) == sorted(checkpoint_names)          # HF names, each exactly once
    model = worker.model_runner.model.model
    expected = InMemoryMerger(MergeOptions(random_seed=3)).merge_state(candidate)
    assert torch.equal(model.lm_head.weight, expected["model.embed_tokens.weight"])
    assert llm.rpcs == 1 and llm.resets == 1                   # one big chunk


def test_untied_models_stream_their_head(family):
    llm, [worker] = engine_for(merge_cfg(family, 0.5, 0.5))
    VllmBackend(InMemoryMerger(MergeOptions()), llm, 1 << 30).load(merge_cfg(family, 1.0, 0.0))
    assert worker.model_runner.model.loaded.count("lm_head.weight") == 1


def test_a_repeated_layer_is_sent_under_both_names(family):
    """A frankenmerge may hand out one tensor object under two names; safetensors refuses to
    encode shared storage twice, so the sender copies it."""
    config = MergeConfig.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["base"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(family["base"]), "layer_range": [2, 4]}]}]})
    llm, [worker] = engine_for(config)
    with torch.no_grad():
        for p in worker.model_runner.model.model.parameters():
            p.zero_()
    VllmBackend(InMemoryMerger(MergeOptions()), llm, 1 << 30).load(config)
    got = params_of(worker)
    expected = InMemoryMerger(MergeOptions()).merge_state(config)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"],
                       got["model.layers.3.mlp.up_proj.weight"])


def test_every_swap_resets_the_prefix_cache_even_when_it_fails(family):
    llm, _ = engine_for(merge_cfg(family, 0.5, 0.5))
    backend = VllmBackend(InMemoryMerger(MergeOptions()), llm, chunk_bytes=20_000)
    for i in range(3):
        backend.load(merge_cfg(family, 0.1 * i, 0.5))
        assert llm.resets == i + 1 and llm.events[-1] == ("reset",)

    failing, _ = engine_for(merge_cfg(family, 0.5, 0.5))
    failing.fail_on_rpc = 2                     # the third chunk's call fails
    with pytest.raises(RuntimeError, match="worker died"):
        VllmBackend(InMemoryMerger(MergeOptions()), failing, 20_000).load(
            merge_cfg(family, 0.3, 0.3))
    assert failing.resets == 1 and failing.events[-1] == ("reset",)

    # and a swap with no tensor at all still resets
    plain = StandInEngine([])
    with weight_swap(plain, 1 << 20):
        pass
    assert plain.events == [("reset",)]


def test_a_refused_reset_is_an_error(family):
    llm, _ = engine_for(merge_cfg(family, 0.5, 0.5))
    llm.reset_answer = False
    with pytest.raises(EvomergeError, match="refused to reset its prefix cache"):
        VllmBackend(InMemoryMerger(MergeOptions()), llm, 1 << 30).load(merge_cfg(family, 1, 0))


def test_a_rank_that_loads_fewer_tensors_is_an_error():
    class Short(StandInEngine):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            return [1]

    with pytest.raises(EvomergeError, match="loaded \\[1\\] tensors of a chunk of 2"):
        with weight_swap(Short([]), 1 << 20) as send:
            send("a", torch.zeros(2))
            send("b", torch.ones(2))


def test_the_extension_class_is_importable_by_its_qualified_name():
    import importlib

    module, _, name = EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is WeightSwap
    assert callable(getattr(WeightSwap, SWAP_METHOD))


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
def test_settings_defaults_and_what_lm_eval_receives():
    s = VllmSettings()
    assert (s.dtype, s.gpu_memory_utilization, s.tensor_parallel_size, s.batch_size,
            s.enforce_eager, s.swap_chunk_mb) == ("auto", 0.5, 1, "auto", False, 1024)
    assert s.lm_kwargs() == {"dtype": "auto", "gpu_memory_utilization": 0.5,
                             "enforce_eager": False, "tensor_parallel_size": 1,
                             "batch_size": "auto", "max_gen_toks": 256}
    s = VllmSettings(max_model_len=4096, max_num_seqs=64, add_bos_token=True, batch_size=32,
                     engine_args={"enable_prefix_caching": True, "kv_cache_dtype": "fp8"})
    kw = s.lm_kwargs()
    assert kw["max_model_len"] == 4096 and kw["max_num_seqs"] == 64 and kw["add_bos_token"]
    assert kw["enable_prefix_caching"] is True and kw["kv_cache_dtype"] == "fp8"
    assert "worker_extension_cls" not in kw and "data_parallel_size" not in kw


def test_genome_vllm_section(tmp_path, make_genome):
    from evolve.genome import load_evolve_config

    g = {"models": ["a", "b"], "merge_method": "linear"}
    cfg = load_evolve_config(make_genome(tmp_path / "g.yaml", g))
    assert cfg.vllm is None
    cfg = load_evolve_config(make_genome(tmp_path / "g.yaml", g, vllm={
        "dtype": "bfloat16", "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2,
        "enforce_eager": True, "max_model_len": 2048, "merge_device": "cuda:0"}))
    assert (cfg.vllm.dtype, cfg.vllm.gpu_memory_utilization, cfg.vllm.tensor_parallel_size,
            cfg.vllm.enforce_eager, cfg.vllm.max_model_len) == ("bfloat16", 0.8, 2, True, 2048)
    # not part of the run's identity: resuming with other engine settings is allowed
    assert "vllm" not in cfg.model_dump(mode="json", exclude={"vllm"})


@pytest.mark.parametrize("section, message", [
    ({"gpu_memory_utilisation": 0.5}, "vllm.gpu_memory_utilisation: unknown key"),
    ({"gpu_memory_utilization": 1.5}, "vllm.gpu_memory_utilization: Input should be less than"),
    ({"gpu_memory_utilization": 0}, "vllm.gpu_memory_utilization: Input should be greater than"),
    ({"dtype": "fp8"}, "vllm.dtype: Input should be 'auto', 'float16', 'bfloat16' or 'float32'"),
    ({"tensor_parallel_size": 0}, "vllm.tensor_parallel_size: Input should be greater than 0"),
    ({"batch_size": "max"}, "vllm.batch_size: 'max' is not a positive integer or 'auto'"),
    ({"merge_device": "tpu"}, "vllm.merge_device: 'tpu' is not a device"),
    ({"engine_args": {"model": "x"}}, "vllm.engine_args: 'model' cannot be set here"),
    ({"engine_args": {"data_parallel_size": 2}}, "'data_parallel_size' cannot be set here"),
    ({"engine_args": {"enforce_eager": True}}, "'enforce_eager' has its own key; write it as "
                                                "vllm.enforce_eager"),
])
def test_bad_vllm_settings_are_one_line_errors(tmp_path, make_genome, section, message):
    from evolve.genome import load_evolve_config

    path = make_genome(tmp_path / "g.yaml", {"models": ["a"], "merge_method": "linear"},
                       vllm=section)
    with pytest.raises(ConfigError) as e:
        load_evolve_config(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("device, gpus, settings, message", [
    ("cpu", 0, {}, "--backend vllm: vLLM runs on GPUs, but --device is cpu with 0 GPU(s)"),
    ("cuda", 1, {"tensor_parallel_size": 2}, "vllm.tensor_parallel_size: 2 GPUs per engine"),
    ("cuda", 0.25, {}, "vllm.gpu_memory_utilization: each engine would claim 0.5 of a GPU"),
])
def test_resource_checks(device, gpus, settings, message):
    with pytest.raises(EvomergeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_resources(VllmSettings(**settings), device, gpus)
    check_resources(VllmSettings(tensor_parallel_size=2), "cuda", 2)
    check_resources(VllmSettings(gpu_memory_utilization=0.4), "cuda", 0.5)


# ---------------------------------------------------------------------------------------------
# The worker, end to end with a stand-in engine behind lm-eval's VLLM class
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_lm_eval_vllm(monkeypatch):
    """Replaces `lm_eval.models.vllm_causallms` (which imports vLLM) with a `VLLM` class that
    records its arguments, builds the stand-in engine from the folder it is given — so the folder
    must hold a loadable merged model, config and tokenizer — and scores through lm-eval's HF
    backend on the stand-in's live model. Test double: the real class needs a real vLLM."""
    created = []

    class VLLM:
        def __init__(self, pretrained, **kwargs):
            from lm_eval.models.huggingface import HFLM
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = Path(pretrained)
            self.files = sorted(p.name for p in folder.iterdir())
            self.kwargs = kwargs
            hf = AutoModelForCausalLM.from_pretrained(folder).eval()
            self.worker = StandInWorker(hf)
            self.model = StandInEngine([self.worker])
            self._hf = HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(folder),
                            batch_size=8, device="cpu")
            self.folder = folder
            created.append(self)

        def __getattr__(self, name):
            return getattr(self.__dict__["_hf"], name)

    module = types.ModuleType("lm_eval.models.vllm_causallms")
    module.VLLM = VLLM
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", module)
    return created


@pytest.fixture
def include_dir(toy_task_dir, tmp_path):
    from evolve import tasks as task_lib

    return task_lib.mirror_search_paths([toy_task_dir], tmp_path / "mirror")


def test_worker_scores_the_swapped_candidate_like_the_hf_backend(
        family, include_dir, fake_lm_eval_vllm):
    from evolve.fitness import EvalSettings
    from evolve.workers import EvalWorker, WorkerSpec

    settings = EvalSettings(task_names=["evo_toy"], metrics={"evo_toy": "acc_norm,none"},
                            include_dir=str(include_dir), limit=12, seed=5)
    initial = merge_cfg(family, 0.5, 0.5).to_dict()
    spec = dict(initial_config=initial, eval=settings, merge_seed=3)
    worker = EvalWorker(WorkerSpec(**spec, backend="vllm",
                                   vllm={"dtype": "float32", "swap_chunk_mb": 1,
                                         "engine_args": {"enable_prefix_caching": True}}))
    assert worker.error is None, worker.error
    [lm] = fake_lm_eval_vllm
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(lm.files)
    assert lm.kwargs["worker_extension_cls"] == EXTENSION
    assert lm.kwargs["seed"] == 5 and lm.kwargs["dtype"] == "float32"
    assert lm.kwargs["enable_prefix_caching"] is True and "data_parallel_size" not in lm.kwargs
    assert not list(lm.folder.glob("*.safetensors"))   # weights live in the engine only
    assert (lm.folder / "config.json").is_file()

    hf_worker = EvalWorker(WorkerSpec(**spec))
    assert hf_worker.error is None
    for weights in ([1.0, -0.5], [0.2, 0.9]):
        candidate = merge_cfg(family, *weights).to_dict()
        got, want = worker.evaluate(candidate), hf_worker.evaluate(candidate)
        assert got.get("error") is None, got
        assert got["scores"] == want["scores"]
    assert lm.model.resets == 2 and lm.model.events[-1] == ("reset",)
    expected = InMemoryMerger(MergeOptions(random_seed=3)).merge_state(
        MergeConfig.from_dict(candidate))
    live = params_of(lm.worker)
    assert all(torch.equal(live[k], v) for k, v in expected.items())


def test_a_failed_engine_start_is_a_worker_error_and_leaves_no_weights(
        family, include_dir, fake_lm_eval_vllm, tmp_path, monkeypatch):
    import tempfile

    from evolve.fitness import EvalSettings
    from evolve.workers import EvalWorker, WorkerSpec

    module = sys.modules["lm_eval.models.vllm_causallms"]

    def no_memory(**kwargs):
        raise ValueError("Free memory on device (1.0/80 GiB) is less than desired GPU memory "
                         "utilization (0.5, 40 GiB).\nDecrease GPU memory utilization")

    monkeypatch.setattr(module, "VLLM", lambda pretrained, **kw: no_memory(**kw))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    settings = EvalSettings(task_names=["evo_toy"], metrics={"evo_toy": "acc,none"},
                            include_dir=str(include_dir), limit=4)
    worker = EvalWorker(WorkerSpec(initial_config=merge_cfg(family, 0.5, 0.5).to_dict(),
                                   eval=settings, backend="vllm"))
    assert worker.error.startswith("ValueError: Free memory on device") and "\n" not in worker.error
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def run_cli(args, capsys):
    from evolve.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.err


def genome(family) -> dict:
    return {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "task_arithmetic",
            "base_model": str(family["base"])}


def test_backend_vllm_without_vllm_is_one_line_and_touches_nothing(
        family, toy_task_dir, tmp_path, make_genome, capsys, monkeypatch):
    import evolve.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_installed", lambda: False)
    path = make_genome(tmp_path / "g.yaml", genome(family))
    storage = tmp_path / "run"
    code, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                         "--backend", "vllm", "--device", "cuda", "--gpus-per-worker", 1],
                        capsys)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: --backend vllm: vLLM is not installed") and \
        "evomerge[vllm]" in err
    assert not storage.exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None,
                    reason="vLLM is installed here")
def test_mergekit_evolve_process_without_vllm(family, tmp_path, make_genome):
    path = make_genome(tmp_path / "g.yaml", genome(family))
    storage = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", "from evolve.cli import main; main()", str(path),
                           "--storage-path", str(storage), "--backend", "vllm"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "--backend vllm: vLLM is not installed" in proc.stderr
    assert not storage.exists()


@pytest.mark.parametrize("args, section, message", [
    (["--gpus-per-worker", 0], None, "--backend vllm: vLLM runs on GPUs, but --device is cpu"),
    (["--device", "cpu"], None, "--backend vllm: vLLM runs on GPUs, but --device is cpu"),
    (["--device", "cuda", "--gpus-per-worker", 1], {"tensor_parallel_size": 4},
     "vllm.tensor_parallel_size: 4 GPUs per engine but --gpus-per-worker is 1"),
    (["--device", "cuda", "--gpus-per-worker", 0.5], {"gpu_memory_utilization": 0.9},
     "vllm.gpu_memory_utilization: each engine would claim 0.9 of a GPU"),
    (["--device", "cuda", "--gpus-per-worker", 1], {"dtype": "fp4"}, "vllm.dtype: Input should"),
])
def test_backend_vllm_needs_gpus(family, toy_task_dir, tmp_path, make_genome, capsys,
                                 monkeypatch, args, section, message):
    import evolve.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_installed", lambda: True)    # past the import check
    extra = {"vllm": section} if section else {}
    path = make_genome(tmp_path / "g.yaml", genome(family), **extra)
    storage = tmp_path / "run"
    code, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                         "--backend", "vllm", *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: ") and message in err, err
    assert not storage.exists()


def test_nothing_imports_vllm():
    code = ("import sys, evolve.cli, evolve.genome, evolve.workers, evolve.fitness, "
            "evolve.vllm_backend, evolve.vllm_ext\n"
            "bad = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.') "
            "or m == 'lm_eval.models.vllm_causallms')\n"
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
