"""`--backend vllm`: score candidates with one vLLM engine per worker, weights swapped in place.

The flow, per worker (docs/vllm.md has the why):
  1. the initial candidate is merged to a scratch folder (config, tokenizer, weights), so that the
     engine's architecture and tokenizer are exactly the merge's;
  2. lm-eval's `VLLM` model class builds the engine from that folder, with our worker extension
     (`evolve.vllm_ext.WeightSwap`); the weight files are deleted once it is up;
  3. per candidate, the merger streams each merged tensor (HF names) into `weight_swap`, which
     ships chunks to every vLLM worker with `collective_rpc` → `model.load_weights`, and then
     resets the prefix cache — `weight_swap` is the only path to the engine, so no swap can skip
     the reset;
  4. the same lm-eval task objects are evaluated on the engine (`TaskScorer`, as for HF).

vLLM is imported only inside functions of this module (and by lm-eval's vLLM class, itself imported
only in `_build_lm`): everything else imports without it, and the settings model below validates
genome files on machines without vLLM.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from merge.errors import EvomergeError

EXTENSION = "evolve.vllm_ext.WeightSwap"
SWAP_METHOD = "evomerge_load_weights"      # a method of WeightSwap, run in every vLLM worker
INSTALL_HINT = "pip install 'evomerge[vllm]'"

# Engine arguments that this backend sets itself, or that would break in-place swapping.
_OWNED_ENGINE_ARGS = {
    "model": "the engine is built from the merged initial candidate",
    "tokenizer": "the engine uses the merge's own tokenizer",
    "worker_extension_cls": "the weight-swap extension is set by evomerge",
    "data_parallel_size": "lm-eval would start a fresh engine per request batch; use --workers",
    "trust_remote_code": "use --trust-remote-code",
    "seed": "use --seed",
    "quantization": "in-place swapping loads unquantized merged tensors",
    "load_format": "the engine loads the initial merge from its folder",
    "enable_lora": "candidates are full merged weights",
}


class VllmSettings(BaseModel):
    """The genome file's optional `vllm:` section (docs/vllm.md lists every key)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    max_model_len: Optional[PositiveInt] = None
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    enforce_eager: bool = False
    tensor_parallel_size: PositiveInt = 1
    max_num_seqs: Optional[PositiveInt] = None
    batch_size: Union[int, str] = "auto"
    max_gen_toks: PositiveInt = 256
    add_bos_token: Optional[bool] = None
    merge_device: Optional[str] = None        # None: the worker's --device
    swap_chunk_mb: PositiveInt = 1024
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"{v!r} is not a positive integer or 'auto'")

    @field_validator("merge_device")
    @classmethod
    def _device(cls, v):
        if v is not None and not (v == "cpu" or v.startswith("cuda")):
            raise ValueError(f"'{v}' is not a device; use cpu, cuda or cuda:N")
        return v

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict) -> dict:
        for key in v:
            if key in _OWNED_ENGINE_ARGS:
                raise ValueError(f"'{key}' cannot be set here: {_OWNED_ENGINE_ARGS[key]}")
            if key in cls.model_fields and key != "engine_args":
                raise ValueError(f"'{key}' has its own key; write it as vllm.{key}")
        return v

    def lm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for lm-eval's `VLLM` (which passes unknown ones on to `vllm.LLM`)."""
        kw: dict[str, Any] = {
            "dtype": self.dtype, "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager, "tensor_parallel_size": self.tensor_parallel_size,
            "batch_size": self.batch_size, "max_gen_toks": self.max_gen_toks}
        for name in ("max_model_len", "max_num_seqs", "add_bos_token"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        kw.update(self.engine_args)
        return kw


# ---------------------------------------------------------------------------------------------
# Driver-side checks (before any worker starts)
# ---------------------------------------------------------------------------------------------
def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_installed() -> None:
    if not vllm_installed():
        raise EvomergeError(f"--backend vllm: vLLM is not installed in this environment; install "
                            f"evomerge[vllm] ({INSTALL_HINT}) here and on every GPU node, or use "
                            f"--backend hf")


def check_resources(settings: VllmSettings, device: str, gpus: float) -> None:
    """vLLM needs a GPU per engine; a tensor-parallel engine needs that many in its worker."""
    if not device.startswith("cuda") or gpus <= 0:
        raise EvomergeError(f"--backend vllm: vLLM runs on GPUs, but --device is {device} with "
                            f"{gpus:g} GPU(s) per worker; use --device cuda --gpus-per-worker 1 "
                            f"(or more) or --backend hf")
    tp = settings.tensor_parallel_size
    if tp > 1 and gpus < tp:
        raise EvomergeError(f"vllm.tensor_parallel_size: {tp} GPUs per engine but "
                            f"--gpus-per-worker is {gpus:g}; pass --gpus-per-worker {tp}")
    if gpus < 1 and settings.gpu_memory_utilization > gpus:
        raise EvomergeError(f"vllm.gpu_memory_utilization: each engine would claim "
                            f"{settings.gpu_memory_utilization:g} of a GPU but workers share GPUs "
                            f"({gpus:g} each); set it below {gpus:g}, leaving room for merging")


# ---------------------------------------------------------------------------------------------
# Weight swapping
# ---------------------------------------------------------------------------------------------
@contextmanager
def weight_swap(llm, chunk_bytes: int):
    """The one way weights reach the engine. Yields `send(name, tensor)`; tensors are shipped in
    chunks of about `chunk_bytes`, and on exit — normal or not — the prefix cache is reset, so KV
    blocks computed with the previous candidate's weights are never reused."""
    sender = _ChunkSender(llm, chunk_bytes)
    try:
        yield sender.add
        sender.flush()
    finally:
        reset_prefix_cache(llm)


def reset_prefix_cache(llm) -> None:
    # vLLM answers False when requests still hold cache blocks; nothing runs between candidates,
    # so that would be a bug — and a silent one, since stale KV gives plausible scores.
    if llm.reset_prefix_cache() is False:
        raise EvomergeError("vLLM refused to reset its prefix cache after a weight swap; cached "
                            "KV of the previous candidate could be reused")


class _ChunkSender:
    def __init__(self, llm, chunk_bytes: int):
        self.llm = llm
        self.chunk_bytes = chunk_bytes
        self.chunk: dict = {}
        self.size = 0
        self._storages: set = set()
        self.sent = 0

    def add(self, name: str, tensor) -> None:
        if name in self.chunk:
            raise EvomergeError(f"weight swap: tensor '{name}' sent twice in one chunk")
        # CPU, as when vLLM reads a checkpoint; a merge may hand out one tensor under two names
        # (a repeated layer), which safetensors refuses to encode twice, so copy the second one.
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        self._storages.add(ptr)
        self.chunk[name] = t
        self.size += t.numel() * t.element_size()
        if self.size >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.chunk:
            return
        from safetensors.torch import save as encode

        payload = encode(self.chunk)
        loaded = self.llm.collective_rpc(SWAP_METHOD, args=(payload,))
        if any(n != len(self.chunk) for n in loaded):
            raise EvomergeError(f"weight swap: vLLM workers loaded {loaded} tensors of a chunk of "
                                f"{len(self.chunk)}")
        self.sent += len(self.chunk)
        self.chunk, self.size, self._storages = {}, 0, set()


# ---------------------------------------------------------------------------------------------
# The worker side
# ---------------------------------------------------------------------------------------------
class VllmBackend:
    """What a Ray worker holds with `--backend vllm`: the merger, the engine, the scorer.

    With `depth` set (a data-flow search), the engine has `depth` layers and every candidate path
    is padded to that depth with identity layers (see `identity_padded`), so paths of any length
    swap in place; identity slots that already hold an identity layer are not sent again."""

    def __init__(self, merger, llm, chunk_bytes: int, scorer=None, folder: Optional[Path] = None,
                 depth: Optional[int] = None):
        self.merger, self.llm, self.chunk_bytes = merger, llm, chunk_bytes
        self.scorer = scorer
        self.folder = folder
        self.depth = depth
        self.identity_from = depth   # engine slots >= this hold identity layers
        self.layer_types = None      # per-layer attention types the engine was built with

    def load(self, config) -> None:
        """Merge `config` in memory and swap its tensors into the engine."""
        if self.depth is not None:
            return self._load_path(config)
        with weight_swap(self.llm, self.chunk_bytes) as send:
            self.merger.merge_stream(config, send)

    def _load_path(self, config) -> None:
        from merge.config import MergeConfig

        from evolve.dataflow import path_of_config

        raw = config.to_dict()
        n = len(path_of_config(raw))
        padded = MergeConfig.from_dict(identity_padded(self.merger, raw, self.depth))
        plan = self.merger.plan(padded)
        types = plan.out_config.get("layer_types")
        if self.layer_types is None:
            self.layer_types = types
        elif types != self.layer_types:
            # vLLM fixes each layer's attention type (sliding window or not) when it builds the
            # engine; weights swapped in cannot change it.
            raise EvomergeError("this path puts layers of different attention types (layer_types) "
                                "in other slots than the engine was built with; use --backend hf "
                                "for this family")
        prefix = _layer_prefix(plan) + "."
        already = range(max(n, self.identity_from), self.depth)   # identity in the engine now

        def layer_of(name: str) -> Optional[int]:
            if not name.startswith(prefix):
                return None
            return int(name[len(prefix):].split(".", 1)[0])

        with weight_swap(self.llm, self.chunk_bytes) as send:
            def sink(name, tensor):
                i = layer_of(name)
                if i is None or i not in already:
                    send(name, tensor)
            self.merger.merge_stream(padded, sink)
        self.identity_from = n

    @classmethod
    def start(cls, spec) -> "VllmBackend":
        """Build everything from a `WorkerSpec` (inside the Ray actor that owns the GPUs)."""
        import atexit

        from merge.config import MergeConfig
        from merge.engine import InMemoryMerger, MergeOptions, merge_to_folder

        from evolve.fitness import TaskScorer

        settings = VllmSettings.model_validate(spec.vllm or {})
        options = MergeOptions(device=settings.merge_device or spec.device,
                               random_seed=spec.merge_seed, quiet=True,
                               trust_remote_code=spec.trust_remote_code, write_model_card=False,
                               cache_magnitudes=spec.cache_magnitudes)
        merger = InMemoryMerger(options)
        config = MergeConfig.from_dict(spec.initial_config)
        depth = getattr(spec, "dataflow_depth", None)
        from evolve.dataflow import is_path_config

        if depth and is_path_config(spec.initial_config):   # one engine at the deepest path
            config = MergeConfig.from_dict(identity_padded(merger, spec.initial_config, depth))
        else:
            depth = None
        folder = Path(tempfile.mkdtemp(prefix="evomerge-vllm-"))
        atexit.register(shutil.rmtree, folder, True)
        plan = merger.plan(config)
        try:
            model_dir = merge_to_folder(config, folder / "model", options, plan=plan)
            _release_cuda_cache()   # vLLM sizes itself from the free memory it sees
            lm = _build_lm(model_dir, settings, seed=spec.eval.seed,
                           trust_remote_code=spec.trust_remote_code)
        except BaseException:   # a failed start is followed by ray.kill: no atexit then
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # The weights now live in the engine and are never read from disk again (every candidate
        # is swapped in); config and tokenizer stay for anything vLLM or lm-eval reads lazily.
        for f in model_dir.glob("*.safetensors*"):
            f.unlink()
        backend = cls(merger, lm.model, settings.swap_chunk_mb * 2**20,
                      scorer=TaskScorer(lm, spec.eval), folder=folder, depth=depth)
        if depth is not None:
            backend.layer_types = plan.out_config.get("layer_types")
        return backend


def identity_padded(merger, config: dict, depth: int) -> dict:
    """A path config padded to `depth` layers with identity layers after the path.

    An identity layer is a copy of the path's last layer with its residual-branch outputs
    (o_proj and down_proj, or the family's equivalents, biases included) scaled by 0: in a
    pre-norm block the branches then add exactly 0 to the stream (a sandwich norm of a zero
    input is zero too), so the padded model's logits equal the path's. Final norm and head still
    come from the last slice's model, so they are unchanged."""
    from merge import architecture
    from merge.config import MergeConfig

    from evolve import fold as fold_lib
    from evolve.dataflow import path_of_config

    n = len(path_of_config(config))
    if n > depth:
        raise EvomergeError(f"a candidate path has {n} layers but the engine holds {depth}; "
                            f"raise genome.layer_stacking.max_layers")
    if n == depth:
        return config
    plan = merger.plan(MergeConfig.from_dict(config))
    last = config["slices"][-1]["sources"][0]
    src = plan.sources[last["model"]]
    arch = architecture.infer(src.config, list(src.tensors), last["model"])
    targets = fold_lib.identity_targets(list(arch.layers[0]), arch.model_type)
    j = last["layer_range"][1] - 1
    identity = {"sources": [{"model": last["model"], "layer_range": [j, j + 1], "parameters": {
        "scale": [{"filter": t, "value": 0.0} for t in targets] + [{"value": 1.0}]}}]}
    out = dict(config)
    out["slices"] = list(config["slices"]) + [identity] * (depth - n)
    return out


def _layer_prefix(plan) -> str:
    from merge import architecture

    src = plan.sources[plan.reference]
    return architecture.infer(src.config, list(src.tensors), plan.reference).layer_prefix


def _build_lm(model_dir: Path, settings: VllmSettings, seed: int, trust_remote_code: bool):
    """lm-eval's VLLM wrapper; with data_parallel_size 1 it creates exactly one `vllm.LLM` (its
    `.model`) from these arguments and keeps it for every later evaluation."""
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(model_dir), trust_remote_code=trust_remote_code, seed=seed,
                worker_extension_cls=EXTENSION, **settings.lm_kwargs())


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
