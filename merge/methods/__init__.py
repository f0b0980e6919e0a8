"""Merge methods, registered by name. Importing this package registers every built-in method."""
from merge.methods.registry import METHODS, MergeInputs, Method, Param, get_method, register
from merge.methods import interpolation, task_vectors  # noqa: F401  (registration side effects)

__all__ = ["METHODS", "MergeInputs", "Method", "Param", "get_method", "register"]
