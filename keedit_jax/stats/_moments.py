"""Uncentred second moments of the MLP keys of every edited layer, in one streaming pass.

The forward stops after the last edited layer (`stop = max(layers) + 1`), and all edited
layers are tapped in the same run: one pass instead of the reference's one pass per layer
(anchors §3), with nothing computed above the last edited layer.

Per batch, KᵀK is a float32 matmul at the highest precision (on TPU the default would round
the keys to bf16) added into a donated device accumulator; every `flush_every` batches the
accumulator is added on the host in the configured dtype (float64: exact enough for any
corpus size, at the cost of one device-to-host copy per flush, not per batch).

Progress lines give the tokens the device has finished (dispatch runs ahead of it) and the
seconds spent compiling, so that a slow first batch of a bucket is told apart from a slow pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax import interrupts, parallel
from keedit_jax.intervene import Taps, run
from keedit_jax.models import ModelConfig, down_proj_path, get_path
from keedit_jax.models.params import Params
from keedit_jax.stats._config import StatsConfig
from keedit_jax.stats._texts import TokenBatch

Array = jax.Array
Log = Callable[[str], None]
Sums = dict[int, dict[str, Array]]  # layer -> {"ff": Σ k kᵀ, "df": Σ v kᵀ, "dd": Σ v vᵀ}
_DEFAULT_CONFIG = StatsConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecondMoment:
    """Sums over `count` real tokens of one layer; the moments are the sums over count.

    sum_ff = Σ k kᵀ [F, F] (k the down-projection input); with values v = W_down k (no bias,
    as LyapLock recomputes it from the weight): sum_df = Σ v kᵀ [D, F], sum_dd = Σ v vᵀ [D, D].
    Sums, not means, are stored, so that passes over disjoint data add exactly.
    """

    sum_ff: np.ndarray
    count: int
    sum_df: np.ndarray | None = None
    sum_dd: np.ndarray | None = None

    def mean(self) -> np.ndarray:
        """E[k kᵀ]: the matrix MEMIT calls C and AlphaEdit eigendecomposes."""
        return self.sum_ff / self._checked_count()

    def mean_vk(self) -> np.ndarray:
        """E[v kᵀ] [D, F] (LyapLock's C_vk)."""
        return _required(self.sum_df, "sum_df") / self._checked_count()

    def mean_vv(self) -> np.ndarray:
        """E[v vᵀ] [D, D] (LyapLock's C_vv)."""
        return _required(self.sum_dd, "sum_dd") / self._checked_count()

    def __add__(self, other: SecondMoment) -> SecondMoment:
        def add(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else a + b

        return SecondMoment(sum_ff=self.sum_ff + other.sum_ff, count=self.count + other.count,
                            sum_df=add(self.sum_df, other.sum_df),
                            sum_dd=add(self.sum_dd, other.sum_dd))

    def _checked_count(self) -> int:
        if self.count <= 0:
            raise ValueError("a second moment over zero tokens has no mean")
        return self.count


def _required(value: np.ndarray | None, name: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{name} was not collected: set StatsConfig(with_values=True)")
    return value


def check_layers(cfg: ModelConfig, layers: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique edited layers, each validated against the model."""
    layers = tuple(sorted({cfg.check_layer(int(index), "statistics layer") for index in layers}))
    if not layers:
        raise ValueError("second moments need at least one layer")
    return layers


def batch_sums(params: Params, cfg: ModelConfig, tokens_bt: Array, segments_bt: Array,
               layers: tuple[int, ...], with_values: bool) -> Sums:
    """Σ k kᵀ (and Σ v kᵀ, Σ v vᵀ) over the real tokens of one batch, for every layer.

    segments_bt: 0 on padding, else the document's id within its row (`TokenBatch`)."""
    real_bt = segments_bt > 0
    _, captures = run(params, cfg, tokens=tokens_bt, attention_mask=real_bt.astype(jnp.int32),
                      segment_ids=segments_bt, stop=max(layers) + 1, taps=Taps(mlp_key=layers))
    real_n1 = real_bt.reshape(-1, 1)
    kernels = get_path(params, down_proj_path(cfg))  # [L, F, D]
    sums: Sums = {}
    for index in layers:
        # where, not a product: a padding position's key must not leak in, even if non-finite.
        keys_nf = jnp.where(real_n1, _rows(captures.mlp_key[index]), 0).astype(jnp.float32)
        sums[index] = {"ff": _gram(keys_nf, keys_nf)}
        if with_values:
            values_nd = jnp.matmul(keys_nf, kernels[index].astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)
            sums[index]["df"] = _gram(values_nd, keys_nf)
            sums[index]["dd"] = _gram(values_nd, values_nd)
    return sums


def _rows(x_btf: Array) -> Array:
    """[B, T, F] -> [B·T, F]: the Gram is then one plain matmul. Contracting two axes
    ("btf,btg->fg") made XLA:CPU run it at 70% of its matmul peak, against 87-95% on rows."""
    return x_btf.reshape(-1, x_btf.shape[-1])


def _gram(a_nx: Array, b_ny: Array) -> Array:
    """aᵀb [X, Y] over the rows, float32 at the highest precision (on TPU the default would
    round the keys to bf16)."""
    return jax.lax.dot_general(a_nx, b_ny, (((0,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "layers", "with_values"),
                   donate_argnums=(0,))
def accumulate_batch(acc: Sums, params: Params, tokens_bt: Array, segments_bt: Array, *,
                     cfg: ModelConfig, layers: tuple[int, ...], with_values: bool) -> Sums:
    """acc + this batch's sums; the accumulator is donated (updated in place) and keeps its
    layout (on a mesh: Σ k kᵀ by rows, the batch's share summed across devices)."""
    total = jax.tree.map(jnp.add, acc,
                         batch_sums(params, cfg, tokens_bt, segments_bt, layers, with_values))
    return {index: {name: parallel.shard(value, _layout(name)) for name, value in sums.items()}
            for index, sums in total.items()}


def _layout(name: str) -> jax.sharding.PartitionSpec:
    """[F, F] sums by rows over the mesh; the d_model-sized ones replicated."""
    return parallel.STATS_ROWS if name == "ff" else jax.sharding.PartitionSpec()


def zero_sums(cfg: ModelConfig, layers: Sequence[int], with_values: bool,
              dtype: np.dtype | type) -> dict[int, dict[str, np.ndarray]]:
    f, d = cfg.mlp_key_dim, cfg.d_model
    shapes = {"ff": (f, f), "df": (d, f), "dd": (d, d)} if with_values else {"ff": (f, f)}
    return {index: {name: np.zeros(shape, dtype) for name, shape in shapes.items()}
            for index in layers}


# jax.monitoring events of one compilation: tracing, lowering to MLIR, XLA's compile.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass
class CompileTime:
    """Programs compiled by XLA and the seconds spent tracing, lowering and compiling."""

    programs: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def compile_time() -> Iterator[CompileTime]:
    """Count the compilations (of any jitted function, any thread) while inside."""
    total = CompileTime()

    def listen(event: str, duration: float, **_: str | int) -> None:
        if event in _COMPILE_EVENTS:
            total.seconds += duration
            total.programs += event == _COMPILE_EVENTS[-1]

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@dataclasses.dataclass(kw_only=True)
class _Progress:
    """Tokens and batches, with a line every `every_s` seconds: tokens/s of finished work
    and the compile time so far."""

    log: Log
    every_s: float
    compiled: CompileTime
    start: float = dataclasses.field(default_factory=time.perf_counter)
    last: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0
    batches: int = 0

    def update(self, n_tokens: int, in_flight: object = None, final: bool = False) -> None:
        # Waiting for each batch costs only the host's tokenising of the next one (ms against
        # seconds of forward); without it dispatch runs ahead and the lines would count
        # queued batches, not computed ones, or not appear until the end.
        jax.block_until_ready(in_flight)
        self.tokens += n_tokens
        self.batches += not final
        if not final and time.perf_counter() - self.last < self.every_s:
            return
        self.last = now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        share = self.compiled.seconds / max(now - self.start, 1e-9)
        self.log(f"statistics: {self.tokens:,} tokens in {self.batches} batches, "
                 f"{rate:,.0f} tokens/s; {self.compiled.programs} programs compiled in "
                 f"{self.compiled.seconds:.1f} s ({share:.0%} of the pass)"
                 + (" (done)" if final else ""))


def second_moments(params: Params, cfg: ModelConfig, batches: Iterable[TokenBatch],
                   layers: Iterable[int], *, config: StatsConfig = _DEFAULT_CONFIG,
                   log: Log = print) -> dict[int, SecondMoment]:
    """E[k kᵀ] sums of every layer in `layers`, in one pass over `batches`.

    Only real tokens (segment id > 0) count. See `texts.length_batches` for batches that
    compile once per row shape.
    """
    layers = check_layers(cfg, layers)
    host_dtype = np.dtype(config.accumulate_dtype)
    host = zero_sums(cfg, layers, config.with_values, host_dtype)
    device = _device_zeros(cfg, layers, config.with_values)
    with compile_time() as compiled:
        progress = _Progress(log=log, every_s=config.log_every_s, compiled=compiled)
        pending = 0
        for batch in batches:  # rows padded to the mesh's batch axes: empty rows add nothing
            device = accumulate_batch(device, params, parallel.put_rows(batch.tokens_bt),
                                      parallel.put_rows(batch.segments_bt), cfg=cfg, layers=layers,
                                      with_values=config.with_values)
            progress.update(batch.n_tokens, device)
            interrupts.raise_pending()
            pending += 1
            if pending == config.flush_every:
                device, pending = _flush(host, device), 0
        if pending:
            _flush(host, device)
        progress.update(0, final=True)
    return {index: SecondMoment(sum_ff=sums["ff"], count=progress.tokens,
                                sum_df=sums.get("df"), sum_dd=sums.get("dd"))
            for index, sums in host.items()}


def _device_zeros(cfg: ModelConfig, layers: Sequence[int], with_values: bool) -> Sums:
    zeros = zero_sums(cfg, layers, with_values, np.float32)
    return {index: {name: parallel.put(value, _layout(name)) for name, value in sums.items()}
            for index, sums in zeros.items()}


def _flush(host: dict[int, dict[str, np.ndarray]], device: Sums) -> Sums:
    """Add the device chunk into the host sums (in place) and return a zeroed device chunk."""
    for index, sums in parallel.to_host(device).items():
        for name, value in sums.items():
            host[index][name] += value.astype(host[index][name].dtype)
    return jax.tree.map(jnp.zeros_like, device)
