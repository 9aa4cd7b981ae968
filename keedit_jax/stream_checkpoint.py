"""Resumable sequential runs: an orbax checkpoint of the stream every k batches.

A step holds everything a killed run needs to continue as if it had never stopped: the
edited layers' kernels, the solvers' carried state (Grams, errors, queues), the stream
position (batches done) and the metrics so far, plus the case ids of every applied batch so a
resumed run can prove that no edit was lost or applied twice. Saves are synchronous and orbax
commits a step only once it is complete, so a SIGKILL during a save leaves the previous step.
A checkpoint directory belongs to one run: resuming under a different configuration (method,
data, hyperparameters) is refused rather than mixing two runs' states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# orbax reports every save step by step at INFO through absl; a run logs its own progress.
logging.getLogger("absl").addFilter(
    lambda record: "orbax" not in record.pathname or record.levelno >= logging.WARNING)

# Run settings that do not change what the stream computes: they may differ on resume.
NOT_FINGERPRINTED = {"output_dir", "overwrite", "checkpoint_dir", "checkpoint_every", "resume"}


class CheckpointMismatchError(ValueError):
    """A checkpoint directory written by a run with another configuration."""


class CheckpointDamagedError(ValueError):
    """A checkpoint directory none of whose steps can be read back."""


class PartialMismatchError(ValueError):
    """partial.json of an interrupted one-time run that this run cannot continue."""


# What orbax and tensorstore raise on a step with missing, truncated or garbled files.
DAMAGE = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def run_fingerprint(configs: Mapping[str, Any]) -> str:
    """A short hash of every setting that changes the stream's result."""
    settings = {group: {k: v for k, v in fields.items() if k not in NOT_FINGERPRINTED}
                for group, fields in configs.items()}
    payload = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def group_settings(groups: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings by group of frozen-dataclass groups (a flag group, a library config), and each
    field's default: what a resumed run is compared on (`setting_changes`)."""
    settings = {name: dataclasses.asdict(group) for name, group in groups.items()}
    defaults = {name: {f.name: f.default for f in dataclasses.fields(group)}
                for name, group in groups.items()}
    return settings, defaults


def setting_changes(saved: Mapping[str, Any], current: Mapping[str, Any],
                    defaults: Mapping[str, Any]) -> list[str]:
    """How this run's settings differ from a checkpoint's, one "group.name: old -> new" each
    (NOT_FINGERPRINTED left out). A setting the checkpoint lacks counts only off its default:
    a newer version's option at its default computes what the older version did."""
    saved, current, defaults = _as_json(saved), _as_json(current), _as_json(defaults)
    changes, missing = [], object()
    for group in sorted(set(saved) | set(current)):
        old, new = saved.get(group, {}), current.get(group, {})
        for name in sorted((set(old) | set(new)) - NOT_FINGERPRINTED):
            before, after = old.get(name, missing), new.get(name, missing)
            if before is missing and after == defaults.get(group, {}).get(name, missing):
                continue
            if before != after:
                changes.append(f"{group}.{name}: "
                               f"{'absent' if before is missing else repr(before)} -> "
                               f"{'absent' if after is missing else repr(after)}")
    return changes


class StreamCheckpoints:
    """Save and restore (state pytree, JSON metadata) at integer steps (batches done).

    With `settings` (the run's configuration by group) and their `defaults`, a step records
    the settings, so a later version of the library resumes it when only options it added
    are new (at their defaults), and a refusal names the settings that differ."""

    def __init__(self, directory: str | Path, fingerprint: str, max_to_keep: int = 2, *,
                 settings: Mapping[str, Any] | None = None,
                 defaults: Mapping[str, Any] | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.fingerprint = fingerprint
        self.settings, self.defaults = settings, defaults or {}
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> None:
        meta = {**metadata, "fingerprint": self.fingerprint, "step": step}
        if self.settings is not None:
            meta["settings"] = _as_json(self.settings)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, like: Any | Callable[[Mapping[str, Any]], Any]
                ) -> tuple[int, Any, dict[str, Any]] | None:
        """The latest intact (step, state, metadata), with `like` giving the state's
        structure, shapes and dtypes, or building them from the step's metadata (a state
        whose shapes change along the stream: GRACE's codebook doubles its capacity); None
        when the directory holds no step. A damaged step is skipped with a warning for the
        one before it (the stream replays what follows); when every step is damaged,
        CheckpointDamagedError names the directory."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return self._restore_step(step, like)
            except CheckpointMismatchError:
                raise
            except DAMAGE as err:
                logging.warning("checkpoint %s step %d is damaged (%s: %s); trying the one "
                                "before it", self.directory, step, type(err).__name__,
                                str(err).splitlines()[0] if str(err) else "")
        if steps:
            raise CheckpointDamagedError(
                f"checkpoint {self.directory}: every step ({', '.join(map(str, steps))}) is "
                "damaged; delete it or run with --noresume to start over")
        return None

    def _restore_step(self, step: int, like: Any | Callable[[Mapping[str, Any]], Any]
                      ) -> tuple[int, Any, dict[str, Any]]:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("fingerprint") != self.fingerprint:
            self._check_settings(step, meta)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                like(meta) if callable(like) else like)
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return step, state, meta

    def _check_settings(self, step: int, meta: Mapping[str, Any]) -> None:
        """A step of another fingerprint resumes only if its recorded settings equal this
        run's up to new options at their defaults; else CheckpointMismatchError."""
        where = f"checkpoint {self.directory} (step {step}) was written by a run with another "
        advice = "; use another --checkpoint_dir, or --noresume to start over in it"
        if "settings" not in meta or self.settings is None:
            raise CheckpointMismatchError(
                f"{where}configuration (fingerprint {meta.get('fingerprint')} != "
                f"{self.fingerprint}){advice}")
        changes = setting_changes(meta["settings"], self.settings, self.defaults)
        if changes:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more"
                                               if len(changes) > 5 else "")
            raise CheckpointMismatchError(f"{where}configuration: {shown}{advice}")
        logging.info("checkpoint %s (step %d) is from an earlier version: its settings equal "
                     "this run's, the options added since at their defaults", self.directory,
                     step)

    def clear(self) -> None:
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def close(self) -> None:
        self.manager.close()
