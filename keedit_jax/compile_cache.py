"""JAX's persistent compilation cache under the project cache, so a second run skips compiling.

`enable_compilation_cache()` points `jax_compilation_cache_dir` at `$KEEDIT_JAX_CACHE`, else
`<project cache>/jax` (`$KEEDIT_CACHE` or `~/.cache/keedit_jax`); `KEEDIT_JAX_CACHE=off` leaves
it off, and a directory already configured (`JAX_COMPILATION_CACHE_DIR`) is kept unless one
is passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from keedit_jax.organism.build import cache_root

OFF = "off"
MIN_COMPILE_SECONDS = 0.0  # every program: a short run compiles many small ones (benchmarks)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the cache on at `directory` (default as above); returns it, or None when off."""
    configured = jax.config.jax_compilation_cache_dir
    if configured and directory is None:
        return Path(configured)
    chosen = directory or os.environ.get("KEEDIT_JAX_CACHE") or cache_root() / "jax"
    if str(chosen) == OFF:
        return None
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return Path(chosen)
