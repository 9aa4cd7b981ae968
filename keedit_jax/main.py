"""Command line: `python -m keedit_jax.main --flagfile=configs/<method>.cfg`.

Parse -> validate -> build -> run -> write (STYLE.md §5). Every flag is a field of a frozen
config in `keedit_jax.flags`; everything is validated, and the output directory proved
writable, before any model is loaded or trained.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
from absl import app, logging
from absl import flags as absl_flags

from keedit_jax import flags as run_flags
from keedit_jax import interrupts, parallel
from keedit_jax.api import resolve_checkpoint
from keedit_jax.compile_cache import enable_compilation_cache
from keedit_jax.data import DatasetError
from keedit_jax.downstream import SolveError
from keedit_jax.files import check_writable_directory
from keedit_jax.methods import check_method_flags, get_method
from keedit_jax.models import (
    CheckpointError,
    ConfigError,
    LayerError,
    config_from_hf,
    gguf,
    read_hf_config,
)
from keedit_jax.models.tokenizer import TokenizerMismatchError
from keedit_jax.results import write_results
from keedit_jax.stats import TextSourceError
from keedit_jax.stream_checkpoint import (
    CheckpointDamagedError,
    CheckpointMismatchError,
    PartialMismatchError,
)
from keedit_jax.upstream import EncodingError, NonFiniteShiftError

run_flags.define_flags()

# Bad input (the message names the file, record, field, layer, request or flag); anything
# else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, ConfigError, gguf.GGUFError, TokenizerMismatchError, DatasetError,
               TextSourceError, EncodingError, SolveError, NonFiniteShiftError,
               CheckpointMismatchError, CheckpointDamagedError, parallel.MeshError,
               PartialMismatchError, FileNotFoundError, PermissionError, LayerError)


def interrupted_line(signame: str, output: Path) -> str:
    """What was kept when a run is stopped: a sequential run resumes from its last checkpoint,
    a long-form run from partial.json, which holds any one-time run's finished batches."""
    return (f"interrupted by {signame}: the batch in progress is abandoned; finished work is in "
            f"{output} (partial.json; the same command run again resumes a sequential run "
            "from its last checkpoint and a long-form run after its finished batches)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    try:
        run_flags.check_exclusive({name for name in absl_flags.FLAGS
                                   if absl_flags.FLAGS[name].present})
        configs = {group.__name__: run_flags.from_flags(group)
                   for group in run_flags.FLAG_GROUPS}
        model, edit, run = configs["ModelFlags"], configs["EditFlags"], configs["RunFlags"]
        method = get_method(edit.method)
        check_method_flags(configs)
        run_flags.check_no_results(Path(run.output_dir), run.overwrite)
        created = not Path(run.output_dir).exists()
        output = check_writable_directory(run.output_dir, "--output_dir")
        if run.export_gguf:
            check_writable_directory(Path(run.export_gguf).parent, "--export_gguf's directory")
        logging.info("JAX compilation cache: %s", enable_compilation_cache())
        devices = configs["ParallelFlags"]
        layout = parallel.start(devices.mesh_config(),
                                devices.distributed_config() if devices.distributed else None)
    except (ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    _log_environment(configs, layout.mesh)
    started = time.perf_counter()
    interrupts.install()
    try:
        checkpoint = resolve_checkpoint(model.model)
        cfg = config_from_hf(read_hf_config(checkpoint), str(checkpoint / "config.json"))
        parallel.check_mesh(cfg, layout.mesh.shape)
        if run.export_gguf:  # refused now, not after the edits
            gguf.check_exportable(cfg)
        with parallel.use_mesh(layout):
            results = method(checkpoint=checkpoint, configs=configs)
        interrupts.raise_pending()  # a signal during the last batch still stops the run
    except USER_ERRORS as err:  # bad input: one clear line, no traceback
        if created and not any(output.iterdir()):  # nothing partial left behind
            output.rmdir()
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print(interrupted_line("SIGINT", output), file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except interrupts.Terminated:
        print(interrupted_line("SIGTERM", output), file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if parallel.is_primary():  # every process computed the same results
        resolved = {name: dataclasses.asdict(cfg) for name, cfg in configs.items()}
        written = write_results(output, resolved, results)
        logging.info("wrote %s", ", ".join(str(p) for p in written))
        print((output / "results.md").read_text())


def _log_environment(configs: dict[str, Any], mesh: jax.sharding.Mesh) -> None:
    logging.info("jax %s, process %d of %d, devices %s, mesh %s", jax.__version__,
                 jax.process_index(), jax.process_count(), jax.devices(), dict(mesh.shape))
    logging.info("config %s", json.dumps({k: dataclasses.asdict(v) for k, v in configs.items()}))


def run_main() -> None:
    """Entry point: flagfiles are checked first so that errors name the file and the line."""
    try:
        run_flags.check_flagfiles(sys.argv)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    app.run(main)


if __name__ == "__main__":
    run_main()
