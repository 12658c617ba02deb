"""Tensor maths of merging: task vectors, sparsifiers, static merge methods."""

from psomerge.merging.methods import METHODS, MergeMethod, MergeOptions, ModelParams, get_method

__all__ = ["METHODS", "MergeMethod", "MergeOptions", "ModelParams", "get_method"]
