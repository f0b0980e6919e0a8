"""MergeInputs for calling a method's kernel directly in tests, as the planner would build them."""
from __future__ import annotations

import torch

from merge.methods import METHODS, MergeInputs

NAME = "model.layers.0.mlp.up_proj.weight"


def inputs(method, tensors, base=None, model_params=None, params=None, name=NAME, seed=0,
           out_dtype=torch.float32) -> MergeInputs:
    """MergeInputs with the method's declared defaults filled in, as the planner would."""
    m = METHODS[method]
    mp = [dict(p) for p in (model_params or [{} for _ in tensors])]
    params = dict(params or {})
    for spec in m.params.values():
        if spec.required:
            continue
        if spec.per_model:
            for p in mp:
                p.setdefault(spec.name, spec.default)
        else:
            params.setdefault(spec.name, spec.default)
    return MergeInputs(name, list(tensors), base, mp, params, seed, out_dtype)
