"""Merge methods, registered by name. Importing this package registers every built-in method.

A method is one kernel function plus its parameter declarations (merge/methods/registry.py);
docs/methods.md describes each one.
"""
from merge.methods.registry import METHODS, MergeInputs, Method, Param, get_method, register
from merge.methods import (  # noqa: F401  (registration side effects)
    arcee_fusion,
    interpolation,
    model_stock,
    nearswap,
    ram,
    sce,
    spherical,
    task_vectors,
)

__all__ = ["METHODS", "MergeInputs", "Method", "Param", "get_method", "register"]
