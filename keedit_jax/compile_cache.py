"""Compile once, ever: JAX's persistent compilation cache, and traced programs kept on disk.

`enable_compilation_cache()` points `jax_compilation_cache_dir` at `$KEEDIT_JAX_CACHE`, else
`<project cache>/jax` (`$KEEDIT_CACHE` or `~/.cache/keedit_jax`); `KEEDIT_JAX_CACHE=off` leaves
it off, and a directory already configured (`JAX_COMPILATION_CACHE_DIR`) is kept unless one
is passed.

The persistent cache starts from the lowered program, so a later run still traces and lowers
every program again: a second short run spent 2.1 of its 2.6 compiling seconds there
(benchmarks/README.md, "Compile time of a short run"). `exported_jit` is `jax.jit` for the
few large programs, which also keeps each traced-and-lowered program as a `jax.export`
artifact under `<compilation cache>/export`, keyed by the function, its static arguments, the
shapes and dtypes of the others, the library's source and the jax version; a later process
deserializes it and goes straight to the (cached) backend compile. Nothing is unpickled: the
artifact is StableHLO in a flatbuffer, and the pytree types in it are re-registered by name
from keedit_jax modules only. Off with the compilation cache, on several devices (shardings
are not in the key), and inside another trace; a program that cannot be exported (a pytree
auxiliary value that is not JSON) runs as plain jit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

from keedit_jax.files import staged_file

OFF = "off"
MIN_COMPILE_SECONDS = 0.0  # every program: a short run compiles many small ones (benchmarks)
EXPORT_DIR = "export"
PACKAGE = "keedit_jax"
# The pytree node types jax.export serializes itself.
BUILTIN_NODES = (dict, list, tuple, type(None))
UNSTABLE_REPR = " at 0x"  # in object.__repr__: an address, other in every process


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the cache on at `directory` (default as above); returns it, or None when off."""
    configured = jax.config.jax_compilation_cache_dir
    if configured and directory is None:
        return Path(configured)
    from keedit_jax.organism.build import cache_root  # noqa: PLC0415 (it imports the models)

    chosen = directory or os.environ.get("KEEDIT_JAX_CACHE") or cache_root() / "jax"
    if str(chosen) == OFF:
        return None
    jax.config.update("jax_compilation_cache_dir", str(chosen))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return Path(chosen)


# ---------------------------------------------------------------- exported programs


@functools.cache
def source_digest() -> str:
    """Changes with any source file of the library or the jax version: a program exported by
    other code is never reused."""
    digest = hashlib.sha256(f"{jax.__version__} {jax.lib.__version__}".encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def node_types(treedef: jax.tree_util.PyTreeDef) -> set[type]:
    """The pytree node types of a tree other than the built-in containers."""
    found, pending = set(), [treedef]
    while pending:
        node = pending.pop()
        data = node.node_data()
        if data is not None and data[0] not in BUILTIN_NODES:
            found.add(data[0])
        pending.extend(node.children())
    return found


def type_name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _as_tuples(value: Any) -> Any:
    """JSON's lists back to the tuples pytree auxiliary data holds."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


_REGISTERED: set[type] = set()


def register_for_export(kind: type) -> None:
    """Let jax.export serialize `kind` by name: a NamedTuple as such, any other node with its
    auxiliary data as JSON (a dataclass's static fields)."""
    if kind in _REGISTERED:
        return
    if issubclass(kind, tuple) and hasattr(kind, "_fields"):
        jax.export.register_namedtuple_serialization(kind, serialized_name=type_name(kind))
    else:
        jax.export.register_pytree_node_serialization(
            kind, serialized_name=type_name(kind),
            serialize_auxdata=lambda aux: json.dumps(aux).encode(),
            deserialize_auxdata=lambda raw: _as_tuples(json.loads(raw)))
    _REGISTERED.add(kind)


def import_type(name: str) -> type:
    """A node type named by `type_name`, imported from keedit_jax only."""
    module, _, qualname = name.partition(":")
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        raise ValueError(f"pytree type {name} is not keedit_jax's")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _abstract(leaf: Any) -> tuple:
    """What a jit specialises a leaf on: a Python scalar's type (weakly typed), else shape,
    dtype and weak type."""
    if isinstance(leaf, bool | int | float | complex):
        return (type(leaf).__name__,)
    return (tuple(leaf.shape), str(leaf.dtype), bool(getattr(leaf, "weak_type", False)))


@dataclasses.dataclass(eq=False)  # hashed by identity, as a jitted function
class ExportedJit:
    """`jax.jit(fn, static_argnames=...)` whose programs are also kept as jax.export
    artifacts (module docstring). Calls, `lower` and other attributes are the jit's."""

    fn: Callable
    static_argnames: tuple[str, ...]

    def __post_init__(self) -> None:
        self.jitted = jax.jit(self.fn, static_argnames=self.static_argnames)
        self.signature = inspect.signature(self.fn)
        self.programs: dict[str, Callable | None] = {}  # key -> loaded program, None: plain jit
        functools.update_wrapper(self, self.fn)

    def __getattr__(self, name: str) -> Any:
        if "jitted" not in self.__dict__:  # not initialised (e.g. mid-copy)
            raise AttributeError(name)
        return getattr(self.__dict__["jitted"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        directory = export_directory()
        if directory is None:
            return self.jitted(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        static = {k: v for k, v in bound.arguments.items() if k in self.static_argnames}
        dynamic = tuple(v for k, v in bound.arguments.items() if k not in self.static_argnames)
        leaves, treedef = jax.tree.flatten(dynamic)
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside another program
            return self.jitted(*args, **kwargs)
        key = self.key(static, treedef, leaves)
        if key is None:  # nothing another process could find: no artifact to write
            return self.jitted(*args, **kwargs)
        if key not in self.programs:
            self.programs[key] = self.load(directory / f"{key}.jaxexport", static, dynamic)
        program = self.programs[key]
        return self.jitted(*args, **kwargs) if program is None else program(*dynamic)

    def key(self, static: dict[str, Any], treedef: Any, leaves: Sequence[Any]) -> str | None:
        """A hash of all the program depends on, or None when a static value or pytree
        auxiliary datum has no stable text (an object's default repr, e.g. a function): its
        artifact would be written anew by every process and never read."""
        described = f"{sorted(static.items())!r} {treedef}"
        if UNSTABLE_REPR in described:
            return None
        text = json.dumps([type_name(self.fn), source_digest(), described,
                           [_abstract(x) for x in leaves]])
        return f"{self.fn.__name__}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"

    def load(self, path: Path, static: dict[str, Any], dynamic: tuple) -> Callable | None:
        """The program from `path`, or exported there now; None: this one runs as plain jit."""
        if path.exists():
            try:
                return jax.jit(deserialize(path.read_bytes()).call)
            except Exception as err:  # noqa: BLE001 (any damage: the program is exported again)
                logging.warning("exported program %s is unreadable (%s: %s); exporting it again",
                                path, type(err).__name__, err)
        names = [name for name in self.signature.parameters if name not in static]

        def program(*values: Any) -> Any:  # the dynamic arguments, in order, by name
            return self.fn(**static, **dict(zip(names, values, strict=True)))

        try:
            exported = jax.export.export(jax.jit(program))(*dynamic)
            payload = serialize(exported)
        except Exception as err:  # noqa: BLE001 (e.g. auxiliary data that is not JSON)
            logging.warning("%s runs without an exported copy (%s: %s)", self.fn.__name__,
                            type(err).__name__, err)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as temporary:  # processes may share the cache
            temporary.write_bytes(payload)
        return jax.jit(exported.call)


def serialize(exported: jax.export.Exported) -> bytes:
    """The artifact: a JSON line naming the pytree types it holds, then jax's flatbuffer."""
    kinds = sorted(node_types(exported.in_tree) | node_types(exported.out_tree), key=type_name)
    for kind in kinds:
        register_for_export(kind)
    header = json.dumps({"types": [type_name(k) for k in kinds]}).encode()
    return header + b"\n" + bytes(exported.serialize())


def deserialize(payload: bytes) -> jax.export.Exported:
    header, _, body = payload.partition(b"\n")
    for name in json.loads(header)["types"]:
        register_for_export(import_type(name))
    return jax.export.deserialize(bytearray(body))


def export_directory() -> Path | None:
    """Where exported programs live: beside the compilation cache, on one device only."""
    configured = jax.config.jax_compilation_cache_dir
    if not configured or jax.device_count() > 1:
        return None
    return Path(configured) / EXPORT_DIR


def exported_jit(fn: Callable | None = None, *,
                 static_argnames: Sequence[str] = ()) -> Any:
    """Decorator: `jax.jit` plus the on-disk exported program (see `ExportedJit`)."""
    if fn is None:
        return functools.partial(exported_jit, static_argnames=static_argnames)
    return ExportedJit(fn, tuple(static_argnames))
