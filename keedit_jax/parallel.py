"""Device meshes, parameter partition rules, sharded batches and the multi-host start.

One code path (STYLE.md §6): no algorithm asks whether it is sharded. Parameters are loaded
straight into arrays laid out by `PARAM_RULES` (each process reads only the slices its devices
hold), token batches are put with their rows over the batch axes, and XLA's partitioner runs
the same jitted functions across the mesh; one constraint (`shard`) keeps the d_ff × d_ff
statistics split by rows. With one device nothing here does anything, so a laptop run is
bit-for-bit the unsharded program.

Axes of the mesh:
  data    replicas: batch rows only
  fsdp    batch rows, and every kernel split along d_model (gathered layer by layer)
  tensor  heads and d_ff (the MLP's inner dimension, so a down-projection's rows)

The d_ff × d_ff solves (Cholesky, eigendecomposition) are not partitioned by XLA: they run
replicated on every device from the row-sharded statistics, which fits — 14336² float32 is
0.8 GB — and leaves the statistics pass, the part that is per-token work, sharded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params, abstract_params, to_device

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
BATCH = P(BATCH_AXES)  # token batches [B, T]: rows over the replicas and the fsdp shards
STATS_ROWS = P(("fsdp", "tensor"), None)  # E[kkᵀ] sums and projectors [F, F]: by rows

# (regex on the '/'-joined parameter path, spec), first match wins. Paths look like HF's
# (`model/layers/mlp/down_proj/kernel`); stacked layer leaves have a leading [L] axis,
# kernels are [d_in, d_out]. Input-side kernels split d_model over fsdp and their output
# (heads, d_ff) over tensor; output-side kernels the other way round; embeddings split
# d_model, so no vocabulary size has to divide the mesh.
_INPUT_SIDE = r"(q_proj|k_proj|v_proj|c_attn|gate_proj|up_proj|c_fc|fc_in)"
_OUTPUT_SIDE = r"(o_proj|out_proj|c_proj|down_proj|fc_out)"
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"(embed_tokens|wte|wpe)/embedding$", P(None, ("fsdp", "tensor"))),
    (r"^lm_head/kernel$", P(("fsdp", "tensor"), None)),
    (rf"layers/.*{_INPUT_SIDE}/kernel$|h/.*{_INPUT_SIDE}/kernel$", P(None, "fsdp", "tensor")),
    (rf"layers/.*{_INPUT_SIDE}/bias$|h/.*{_INPUT_SIDE}/bias$", P(None, "tensor")),
    (rf"layers/.*{_OUTPUT_SIDE}/kernel$|h/.*{_OUTPUT_SIDE}/kernel$", P(None, "tensor", "fsdp")),
    (r".*", P()),  # norms, output-side biases, GPT-J's head bias: replicated
)


# XLA's partitioners. Shardy, JAX 0.10's default, computes μKE's affinities wrongly for the
# edits of the second data shard on a data=2 × fsdp=2 × tensor=2 CPU mesh (O(1) errors;
# tests/test_parallel.py); GSPMD computes them to 1e-7, so it is ours until Shardy agrees.
PARTITIONERS = ("gspmd", "shardy")


class MeshError(ValueError):
    """A mesh or process layout that cannot run; raised before any model is loaded."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the data, fsdp and tensor axes; one of them may be -1 (the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    partitioner: str = "gspmd"

    def __post_init__(self) -> None:
        if self.partitioner not in PARTITIONERS:
            raise MeshError(f"--partitioner={self.partitioner!r}: one of {PARTITIONERS}")
        sizes = self.sizes()
        bad = [f"--mesh_{axis}={size}" for axis, size in sizes.items() if size < 1 and size != -1]
        if bad:
            raise MeshError(f"{', '.join(bad)}: a mesh axis size is >= 1, or -1 for the rest")
        if list(sizes.values()).count(-1) > 1:
            raise MeshError(f"only one mesh axis may be -1 (the remaining devices), got {sizes}")

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    def shape(self, n_devices: int) -> dict[str, int]:
        """The axis sizes on `n_devices`; the product must be exactly the device count."""
        sizes = self.sizes()
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if n_devices % fixed:
                raise MeshError(f"the mesh {_describe(sizes)} does not divide the {n_devices} "
                                f"devices: the fixed axes multiply to {fixed}")
            sizes = {a: n_devices // fixed if s == -1 else s for a, s in sizes.items()}
        if math.prod(sizes.values()) != n_devices:
            raise MeshError(f"the mesh {_describe(sizes)} has {math.prod(sizes.values())} "
                            f"devices, but there are {n_devices} ({jax.process_count()} "
                            "process(es)); make the axis sizes multiply to the device count "
                            "or set one to -1")
        return sizes


def _describe(sizes: Mapping[str, int]) -> str:
    return "(" + " ".join(f"--mesh_{axis}={size}" for axis, size in sizes.items()) + ")"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the partitioner that compiles programs over it."""

    mesh: Mesh
    partitioner: str = "gspmd"


def make_mesh(config: MeshConfig, devices: list[Any] | None = None) -> Layout:
    """The (data, fsdp, tensor) mesh over `devices` (all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    sizes = config.shape(len(devices))
    mesh = jax.make_mesh(tuple(sizes.values()), AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    return Layout(mesh, config.partitioner)


def _path_name(key_path: tuple) -> str:
    return "/".join(k.key for k in key_path)


def param_specs(cfg: ModelConfig) -> Params:
    """The PartitionSpec of every parameter, from `PARAM_RULES`."""
    def spec(key_path: tuple, _: Any) -> P:
        name = _path_name(key_path)
        return next(s for pattern, s in PARAM_RULES if re.search(pattern, name))

    return jax.tree_util.tree_map_with_path(spec, abstract_params(cfg))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg))


def check_mesh(cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> None:
    """Every sharded dimension of every parameter, and d_ff for the statistics' rows, divides
    by its mesh axes; all violations are reported at once."""
    problems = []
    specs = param_specs(cfg)
    abstract = abstract_params(cfg)
    for (key_path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                                      strict=True):
        for dim, (size, axes) in enumerate(zip(leaf.shape, spec, strict=False)):
            problems += _indivisible(f"{_path_name(key_path)} dim {dim}", size, axes,
                                     mesh_shape)
    problems += _indivisible("the statistics' rows (d_ff)", cfg.mlp_key_dim, STATS_ROWS[0],
                             mesh_shape)
    if problems:
        raise MeshError(f"the mesh {_describe(mesh_shape)} does not divide the model's "
                        "dimensions:\n  " + "\n  ".join(problems))


def _indivisible(what: str, size: int, axes: str | tuple[str, ...] | None,
                 mesh_shape: Mapping[str, int]) -> list[str]:
    axes = (axes,) if isinstance(axes, str) else axes or ()
    parts = math.prod(mesh_shape[a] for a in axes)
    return [] if size % parts == 0 else [f"{what} = {size} is not divisible by "
                                         f"{'×'.join(axes)} = {parts}"]


# ---------------------------------------------------------------- the active mesh


def active_mesh() -> Mesh | None:
    """The mesh set by `use_mesh`, or None when the run is on one device."""
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


@contextlib.contextmanager
def use_mesh(layout: Layout) -> Iterator[None]:
    """Make the layout's mesh the one every helper here uses, compiled by its partitioner;
    a one-device mesh changes nothing."""
    if layout.mesh.size == 1:
        yield
        return
    shardy = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", layout.partitioner == "shardy")
    try:
        with jax.set_mesh(layout.mesh):
            yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", shardy)


def model_shardings(cfg: ModelConfig) -> Params | None:
    """NamedShardings of the parameters on the active mesh (None on one device)."""
    mesh = active_mesh()
    return None if mesh is None else param_shardings(cfg, mesh)


def shard(x: jax.Array, spec: P) -> jax.Array:
    """Constrain `x` to `spec` on the active mesh, inside or outside jit; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def batch_multiple() -> int:
    """Rows of a batch must be a multiple of this to split over the batch axes."""
    mesh = active_mesh()
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def put(array: np.ndarray, spec: P) -> jax.Array:
    """A host array on the active mesh laid out by `spec` (`to_device` without one).
    Every process must pass the same array: each device takes its own block from it."""
    mesh = active_mesh()
    if mesh is None:
        return to_device(array)
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec),
                                        lambda index: array[index])


def put_rows(array: np.ndarray) -> jax.Array:
    """A host batch [B, ...] with its rows over the batch axes; zero rows are appended up to
    a multiple of the batch axes (give them mask 0)."""
    missing = -len(array) % batch_multiple()
    if missing:
        array = np.concatenate([array, np.zeros((missing, *array.shape[1:]), array.dtype)])
    return put(array, BATCH)


def put_batch(tree: Any) -> Any:
    """A batch of edits (every leaf [E, ...]) with its rows over the batch axes when E divides
    by them, replicated otherwise: edits are never padded in."""
    multiple = batch_multiple()
    return jax.tree.map(lambda x: put(x, BATCH if len(x) % multiple == 0 else P()), tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of the arrays of `tree`, gathered across processes when they span
    several (a collective: every process must call it at the same point)."""
    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def is_primary() -> bool:
    """Process 0 writes the results; the others compute the same things."""
    return jax.process_index() == 0


# ---------------------------------------------------------------- multi-host start


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """jax.distributed's arguments; empty/0/-1 leave a value to the environment (TPU pods,
    SLURM and Open MPI are detected by JAX)."""

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    def __post_init__(self) -> None:
        if self.num_processes < 0:
            raise MeshError(f"--num_processes must be >= 0 (0: from the environment), got "
                            f"{self.num_processes}")
        if self.num_processes and not -1 <= self.process_id < self.num_processes:
            raise MeshError(f"--process_id={self.process_id} is outside the "
                            f"--num_processes={self.num_processes} processes (0.."
                            f"{self.num_processes - 1})")
        if self.coordinator_address and (self.num_processes == 0 or self.process_id < 0):
            raise MeshError(f"--coordinator_address={self.coordinator_address} needs "
                            "--num_processes and --process_id (the same command on every "
                            "host, with its own --process_id)")


def initialize(config: DistributedConfig) -> None:
    """Start jax.distributed, then prove the process count is the one asked for."""
    jax.distributed.initialize(coordinator_address=config.coordinator_address or None,
                               num_processes=config.num_processes or None,
                               process_id=None if config.process_id < 0 else config.process_id)
    if config.num_processes and jax.process_count() != config.num_processes:
        raise MeshError(f"--num_processes={config.num_processes}, but jax.distributed "
                        f"connected {jax.process_count()} process(es)")


def start(mesh: MeshConfig, distributed: DistributedConfig | None) -> Layout:
    """jax.distributed (when asked) and the mesh over every process's devices: all layout
    errors surface here, before a checkpoint is opened."""
    if distributed is not None:
        initialize(distributed)
    return make_mesh(mesh)
