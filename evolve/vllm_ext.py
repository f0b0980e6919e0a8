"""The piece of evomerge that runs inside vLLM's own worker processes.

vLLM mixes `worker_extension_cls` into each GPU worker's class, so the methods below run with `self`
being a vLLM worker (one per tensor-parallel rank) and are called from the engine's owner through
`LLM.collective_rpc(name, args=...)`. Nothing here imports vLLM: the class is a plain mixin, and the
module imports cleanly (and is tested) without vLLM installed.

Wire format: one call carries one chunk of merged tensors as a safetensors-encoded byte string.
Bytes travel unchanged through every transport vLLM uses for RPC arguments (a direct call
in-process, msgpack to a multiprocess engine core, pickle through shared memory to tensor-parallel
workers), keep names, dtypes and shapes exactly, and need no insecure-serialization switch.
"""
from __future__ import annotations


class WeightSwap:
    """Loads a chunk of Hugging Face-named tensors into the worker's live model, in place.

    `model.load_weights` is vLLM's own checkpoint loader: it maps HF names to its fused parameters
    (q/k/v → qkv_proj, gate/up → gate_up_proj), skips `lm_head.weight` when embeddings are tied, and
    on tensor-parallel ranks cuts each full tensor down to the rank's shard.
    """

    # The method name is prefixed: vLLM refuses extension attributes that clash with the worker's.
    def evomerge_load_weights(self, payload: bytes) -> int:
        from safetensors.torch import load as decode

        weights = decode(payload)
        self.model_runner.model.load_weights(weights=list(weights.items()))
        return len(weights)
