"""The parameter pytree: a nested dict named like the HF modules, layers stacked on axis 0.

`layer` / `layer_path` are the only ways code reaches into one layer (STYLE.md §2), so the
stacked layout stays a detail of this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from keedit_jax.models.config import ModelConfig
from keedit_jax.models.family import get_family

Array = jax.Array
Params = dict[str, Any]
Path = tuple[str, ...]


def to_device(array: Any) -> Array:
    """A host (NumPy) array on the default device, uncommitted as jnp.asarray's result: in jax
    0.10 jnp.asarray of a NumPy array compiles an identity program (`lax.stage`) for every new
    shape, 30-90 of them in a short run, where device_put compiles none."""
    return jax.device_put(array)


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def abstract_params(cfg: ModelConfig, dtype: jnp.dtype = jnp.float32) -> Params:
    """The parameter tree as ShapeDtypeStructs: for eval_shape, loading and memory estimates."""
    shapes = get_family(cfg).param_shapes(cfg)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=_is_shape)


@partial(jax.jit, static_argnames=("cfg", "dtype", "std"))
def init_params(cfg: ModelConfig, key: Array, dtype: jnp.dtype = jnp.float32,
                std: float = 0.02) -> Params:
    """Random weights (normal kernels and embeddings, unit scales, zero biases).

    For benchmarks at real shapes and for training the organism from scratch. One compiled
    program for the whole tree, so initialising is not one compilation per leaf.
    """
    abstract = abstract_params(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(key, len(leaves))

    def init_leaf(path: tuple, leaf: jax.ShapeDtypeStruct, k: Array) -> Array:
        name = path[-1].key
        if name == "scale":
            return jnp.ones(leaf.shape, dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, dtype)
        return (std * jax.random.normal(k, leaf.shape, jnp.float32)).astype(dtype)

    return jax.tree_util.tree_unflatten(
        treedef, [init_leaf(p, leaf, k) for (p, leaf), k in zip(leaves, keys, strict=True)])


def get_path(tree: Mapping[str, Any], path: Path) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: Params, path: Path, value: Any) -> Params:
    """A copy of `tree` with `path` replaced; untouched subtrees are shared, not copied."""
    if not path:
        return value
    head, *rest = path
    return {**tree, head: set_path(tree[head], tuple(rest), value)}


def layer_stack(params: Params, cfg: ModelConfig) -> Params:
    """All decoder layers, each leaf stacked [L, ...]."""
    return get_path(params, get_family(cfg).layers_path)


def layer(params: Params, cfg: ModelConfig, index: int | Array) -> Params:
    """One layer's parameters; `index` may be traced (inside a loop over layers)."""
    return jax.tree.map(lambda x: x[index], layer_stack(params, cfg))


def set_layers(params: Params, path: Path, layers: Mapping[int, Any]) -> Params:
    """A copy of params with entry i of the stacked subtree at `path` (one array [L, ...] or
    a layer's whole tree of them) replaced by layers[i], cast to the stack's dtypes: the one
    way an edited layer is written back."""
    stack = get_path(params, path)
    for index, value in layers.items():
        stack = jax.tree.map(lambda s, x, i=index: s.at[i].set(jnp.asarray(x, s.dtype)),
                             stack, value)
    return set_path(params, path, stack)


def down_proj_path(cfg: ModelConfig) -> Path:
    """Path of the stacked down-projection kernel [L, F, D]: the matrix locate-and-edit changes."""
    family = get_family(cfg)
    return family.layers_path + family.down_proj_path + ("kernel",)


def cast(params: Params, dtype: jnp.dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)


def count(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
