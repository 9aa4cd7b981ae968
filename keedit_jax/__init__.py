"""keedit_jax: locate-and-edit knowledge editing of LLMs in JAX (MEMIT, AlphaEdit, μKE, ...).

Every method runs as pure functions over Flax parameter pytrees. The editing API
(`keedit_jax.api`: load, edit, SequentialEditor, evaluate, read_records,
hparams_from_flagfile) is imported on first use, so `import keedit_jax` stays cheap.
"""

from typing import Any

__version__ = "0.1.0"

API = ("EditResult", "SequentialEditor", "edit", "evaluate", "hparams_from_flagfile", "load",
       "read_records")
__all__ = list(API)


def __getattr__(name: str) -> Any:
    if name in API:
        from keedit_jax import api  # noqa: PLC0415 (heavy: jax and the models)

        return getattr(api, name)
    raise AttributeError(f"module 'keedit_jax' has no attribute {name!r}")
