"""The engine's public entry points: plan a config, stream it to a folder or into a live model.

    merge_to_folder(config, out_dir, options)      what `mergekit-yaml` does
    InMemoryMerger(options).merge_into(cfg, model)  what evolution does for every candidate

Both run the same plan through the same kernels with the same dtype casts, so a candidate merged in
memory is bit-identical to the same config merged to disk.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from merge.config import MergeConfig
from merge.errors import EvomergeError
from merge.plan import Plan, SourceCache, TensorPlan, build_plan

log = logging.getLogger("merge")


@dataclass
class MergeOptions:
    device: str = "cpu"
    random_seed: Optional[int] = None
    out_shard_size: int = 5 * 10**9
    copy_tokenizer: bool = True
    write_model_card: bool = True
    overwrite: bool = False
    quiet: bool = False
    num_threads: Optional[int] = None
    trust_remote_code: bool = False
    allow_crimes: bool = False
    clone_tensors: bool = False
    truncate_vocab: bool = False
    # In-memory merges only: keep each task vector's magnitudes in sorted order (2 bytes per
    # parameter per model) so TIES/breadcrumbs thresholds are lookups (merge/methods/magnitude_order.py)
    cache_magnitudes: bool = False


def validate(config: MergeConfig, options: Optional[MergeOptions] = None,
             cache: Optional[SourceCache] = None) -> Plan:
    """Check everything that can be checked from headers; load no tensor. Settings that are
    accepted but have no effect are reported as warnings on stderr (see `report_warnings`)."""
    options = options or MergeOptions()
    plan = build_plan(config, cache, allow_crimes=options.allow_crimes,
                      truncate_vocab=options.truncate_vocab)
    report_warnings(plan.warnings)
    return plan


_REPORTED: set[str] = set()


def report_warnings(warnings: list[str]) -> None:
    """Each warning once per process, one line on stderr (`warning: <field>: <what>`): an
    evolutionary search re-plans the same config shape for every candidate."""
    import sys

    for w in warnings:
        if w not in _REPORTED:
            _REPORTED.add(w)
            print(f"warning: {w}", file=sys.stderr)


def model_layer_count(model_ref: str) -> int:
    from merge.architecture import layer_count
    from merge.sources import ModelSource

    return layer_count(ModelSource.open(model_ref).config)[1]


class TensorReader:
    """Reads a plan's inputs from the memory-mapped sources, optionally keeping them for reuse."""

    def __init__(self, plan_sources, device: str, keep: bool = False, clone: bool = False):
        self.sources = plan_sources
        self.device = device
        self.keep = keep
        self.clone = clone
        self.cache: dict[tuple[str, str], object] = {}

    def read(self, model: str, tensor: str):
        key = (model, tensor)
        if key in self.cache:
            return self.cache[key]
        t = self.sources[model].read(tensor, self.device)
        if self.clone:
            t = t.clone()
        if self.keep:
            self.cache[key] = t
        return t


def _torch_dtype(code_or_name: Optional[str]):
    import torch

    if code_or_name is None:
        return None
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F64": torch.float64, "float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16, "float64": torch.float64}.get(code_or_name)


def merge_tensor(plan: Plan, tp: TensorPlan, reader: TensorReader, seed: Optional[int],
                 out=None, orders: Optional[dict] = None):
    """One output tensor: read its inputs, cast to the compute dtype, run the kernel.

    `out` (optional) is a destination the kernel may write into directly; the result is returned
    either way (it is `out` itself when the kernel used it). `orders` (optional) keeps the sorted
    magnitudes of task vectors between merges (see MergeOptions.cache_magnitudes)."""
    from merge.methods import MergeInputs

    compute = _torch_dtype(plan.compute_dtype)
    out_dtype = _torch_dtype(tp.dtype)

    def load(inp):
        t = reader.read(inp.model, inp.tensor)
        return t.to(compute) if compute is not None and t.is_floating_point() else t

    if tp.copy_only:
        return reader.read((tp.base or tp.inputs[0]).model, (tp.base or tp.inputs[0]).tensor)
    if tp.vocab:
        return _merge_vocab_tensor(plan, tp, load, seed, out_dtype, out)
    inputs = MergeInputs(name=tp.name, tensors=[load(i) for i in tp.inputs],
                         base=load(tp.base) if tp.base else None, model_params=tp.model_params,
                         params=tp.params, seed=seed, out_dtype=out_dtype, out=out)
    if orders is not None and tp.base is not None:
        inputs.orders = lambda i: _magnitude_order(orders, tp, i, inputs)
    out = plan.method.kernel(inputs)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out


def _magnitude_order(cache: dict, tp: TensorPlan, i: int, inputs):
    from merge.methods.magnitude_order import MagnitudeOrder

    x, base = tp.inputs[i], tp.base
    key = (x.model, x.tensor, base.model, base.tensor, str(inputs.tensors[i].dtype))
    order = cache.get(key)
    if order is None:
        order = cache[key] = MagnitudeOrder(inputs.tensors[i], inputs.base)
    return order


def _merge_vocab_tensor(plan: Plan, tp: TensorPlan, load, seed, out_dtype, out=None):
    """Embedding/head rows: re-index every model to the output vocabulary (fill rows where a model
    lacks a token, see merge/vocab.py), then run the configured method on them like on any tensor,
    as the reference toolkit does."""
    from merge.methods import MergeInputs
    from merge.vocab import reindex

    members = ([tp.base] if tp.base else []) + list(tp.inputs)
    rows = reindex(plan.vocab, {m.model: load(m) for m in members},
                   tp.base.model if tp.base else None)
    inputs = MergeInputs(tp.name, [rows[i.model] for i in tp.inputs],
                         rows[tp.base.model] if tp.base else None, tp.model_params, tp.params,
                         seed, out_dtype, out=out)
    result = plan.method.kernel(inputs)
    return result if result.dtype == out_dtype else result.to(out_dtype)


def execute(plan: Plan, sink: Callable[[str, object], None], reader: TensorReader,
            options: MergeOptions, progress: bool = True,
            destination: Optional[Callable[[str], object]] = None,
            orders: Optional[dict] = None) -> None:
    """Merge every tensor of the plan and hand it to `sink(name, tensor)`. `destination(name)`,
    when given, names a tensor the kernel may write the result into (see merge_tensor)."""
    import torch
    from tqdm import tqdm

    from merge.methods.parallel import set_workers

    # Parallelism comes from whole chunks on worker threads (merge/methods/parallel.py); every op
    # on the main thread runs single-threaded. With torch's own threads, each small op ends in a
    # barrier that, on a busy machine, costs milliseconds while the second thread spins
    # (measured: 8 ms vs 0.008 ms for a 65k-element subtraction at load 4 on 2 cores).
    threads = torch.get_num_threads()
    set_workers(options.num_threads or threads)
    torch.set_num_threads(1)
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merging",
               disable=not progress or options.quiet, leave=False)
    try:
        with torch.no_grad():
            for tp in plan.tensors:
                bar.set_postfix_str(tp.name[-40:], refresh=False)
                out = destination(tp.name) if destination is not None else None
                sink(tp.name, merge_tensor(plan, tp, reader, options.random_seed, out, orders))
                bar.update(tp.nbytes)
    finally:
        bar.close()
        torch.set_num_threads(threads)
        set_workers(None)


def merge_to_folder(config: MergeConfig, out_dir, options: Optional[MergeOptions] = None,
                    plan: Optional[Plan] = None) -> Path:
    from merge.card import write_model_card
    from merge.tokenizer import write_tokenizer
    from merge.writer import AtomicFolder, ShardedWriter, check_output_folder

    options = options or MergeOptions()
    out_dir = Path(out_dir)
    plan = plan or validate(config, options)
    check_output_folder(out_dir, options.overwrite, [s.folder for s in plan.sources.values()])
    _check_device(options.device)
    specs = [(t.name, t.shape, t.dtype, t.nbytes) for t in plan.tensors]
    reader = TensorReader(plan.sources, options.device, clone=options.clone_tensors)
    with AtomicFolder(out_dir, options.overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, options.out_shard_size)
        try:
            execute(plan, writer.write, reader, options)
            writer.finish()
        finally:
            writer.abort()
        (tmp / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
        reference = plan.sources[plan.reference].folder
        if options.copy_tokenizer or plan.vocab is not None:
            write_tokenizer(plan, tmp)
        gen = reference / "generation_config.json"
        if gen.is_file():
            (tmp / "generation_config.json").write_bytes(gen.read_bytes())
        import yaml

        (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if options.write_model_card:
            write_model_card(tmp, plan, out_dir.name)
    return out_dir


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvomergeError(f"--device: '{device}' requested but no CUDA GPU is available; "
                                f"drop --cuda/--device to merge on the CPU")


class InMemoryMerger:
    """Merges configs over the same input models again and again, without touching disk.

    Input tensors are read once and kept (on `options.device`); each merge re-plans the config
    (cheap: headers are cached) and streams the results into a live model's parameters.
    """

    def __init__(self, options: Optional[MergeOptions] = None):
        self.options = options or MergeOptions(quiet=True)
        self.cache = SourceCache()
        self._reader: Optional[TensorReader] = None
        self._orders: Optional[dict] = {} if self.options.cache_magnitudes else None

    @property
    def magnitude_cache_bytes(self) -> int:
        """Memory held by kept magnitude orders (MergeOptions.cache_magnitudes)."""
        return sum(o.nbytes for o in (self._orders or {}).values())

    def plan(self, config: MergeConfig) -> Plan:
        plan = validate(config, self.options, self.cache)
        if self._reader is None:
            _check_device(self.options.device)
            self._reader = TensorReader(self.cache.models, self.options.device, keep=True)
        return plan

    def merge_state(self, config: MergeConfig) -> dict:
        state: dict = {}
        self.merge_stream(config, state.__setitem__)
        return state

    def merge_stream(self, config: MergeConfig, sink: Callable[[str, object], None]) -> None:
        """Hand each merged tensor to `sink(name, tensor)` as it is made, under its checkpoint name
        (a tied model has no separate head tensor). The sink may keep or send it; nothing else
        holds it."""
        plan = self.plan(config)   # first: it opens the reader on the first call
        execute(plan, sink, self._reader, self.options, progress=False, orders=self._orders)

    def merge_into(self, config: MergeConfig, model) -> None:
        import torch

        plan = self.plan(config)
        targets = dict(model.named_parameters())
        targets.update(dict(model.named_buffers()))
        missing = [t.name for t in plan.tensors if t.name not in targets]
        if missing:
            raise EvomergeError(f"the model has no parameter '{missing[0]}'; build it with "
                                f"InMemoryMerger.build_model for this config's layout")

        # Kernels write straight into the parameters (detached views: chunk threads do not see
        # this thread's no_grad); whatever a kernel returns elsewhere is copied in.
        live = {name: t.detach() for name, t in targets.items()}

        def copy_in(name, tensor):
            target = live[name]
            if tensor.data_ptr() != target.data_ptr():
                with torch.no_grad():
                    target.copy_(tensor)

        execute(plan, copy_in, self._reader, self.options, progress=False,
                destination=live.get, orders=self._orders)

    def build_model(self, config: MergeConfig):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        plan = self.plan(config)
        cfg_dict = dict(plan.out_config)
        model_type = cfg_dict.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **cfg_dict)
        dtype = _torch_dtype(plan.out_config.get("dtype") or plan.out_config.get("torch_dtype")) \
            or torch.float32
        model = AutoModelForCausalLM.from_config(
            hf_config, torch_dtype=dtype, trust_remote_code=self.options.trust_remote_code)
        model.to(self.options.device)
        self.merge_into(config, model)
        return model.eval()
