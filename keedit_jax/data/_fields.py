"""Validated field access for JSON dataset records: every problem is collected, none is fatal.

A reader walks every record with a `FieldReader`, which notes each malformed field (missing,
wrong type, empty, a template without "{}") instead of raising, so that one `DatasetError` can
list the problems of the whole file: a dataset is either read completely or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

MAX_REPORTED = 20  # problems listed in one error message; the exception keeps all of them

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldProblem:
    """One malformed field: record `index` (0-based position in the file), dotted `field`."""

    index: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"record {self.index}, field {self.field!r}: {self.message}"


class DatasetError(ValueError):
    """A dataset file that cannot be read; names the file and every malformed record field."""

    def __init__(self, path: str | pathlib.Path, problems: Sequence[FieldProblem] = (),
                 message: str | None = None) -> None:
        self.path = pathlib.Path(path)
        self.problems = tuple(problems)
        if message is None:
            listed = "\n  ".join(str(p) for p in self.problems[:MAX_REPORTED])
            more = len(self.problems) - MAX_REPORTED
            message = (f"{len(self.problems)} malformed field(s):\n  {listed}"
                       + (f"\n  ... and {more} more" if more > 0 else ""))
        super().__init__(f"{self.path}: {message}")


def load_records(path: str | pathlib.Path) -> list[Any]:
    """The top-level JSON list of a dataset file; DatasetError if it is not one."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(path, message=f"cannot read JSON: {error}") from error
    if not isinstance(data, list):
        raise DatasetError(path, message=f"expected a JSON list of records, got "
                                         f"{type(data).__name__}")
    return data


class FieldReader:
    """Reads typed fields of one record, appending a FieldProblem for each malformed one.

    Mutable on purpose: it is a per-record accumulator. Each accessor returns a placeholder
    of the right type after a problem, so a reader can keep going and report every field.
    """

    def __init__(self, record: Any, index: int) -> None:
        self.record = record
        self.index = index
        self.problems: list[FieldProblem] = []
        if not isinstance(record, dict):
            self.note("<record>", f"expected an object, got {type(record).__name__}")

    def note(self, field: str, message: str) -> None:
        self.problems.append(FieldProblem(index=self.index, field=field, message=message))

    def raw(self, field: str, kind: type, *, optional: bool = False) -> Any:
        """The value at dotted path `field` if it exists and is a `kind`, else None."""
        value: Any = self.record
        for key in field.split("."):
            if not isinstance(value, dict):
                return None  # the parent was already reported (or the record is not a dict)
            if key not in value:
                if not optional:
                    self.note(field, "missing")
                return None
            value = value[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            self.note(field, f"expected {_TYPE_NAMES.get(kind, kind.__name__)}, "
                             f"got {type(value).__name__}")
            return None
        return value

    def text(self, field: str, *, template: bool = False) -> str:
        """A non-empty string; with `template`, one that holds exactly one "{}" and no other braces
        (anchors §8), so that `str.format` fills it."""
        value = self.raw(field, str)
        if value is None:
            return ""
        return self._check_text(field, value, template)

    def texts(self, field: str, *, minimum: int = 0) -> tuple[str, ...]:
        """A list of non-empty strings (at least `minimum`); problems name the list index."""
        value = self.raw(field, list)
        if value is None:
            return ()
        if len(value) < minimum:
            self.note(field, f"expected at least {minimum} item(s), got {len(value)}")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.note(f"{field}[{i}]", f"expected a string, got {type(item).__name__}")
            else:
                out.append(self._check_text(f"{field}[{i}]", item, False))
        return tuple(out)

    def _check_text(self, field: str, value: str, template: bool) -> str:
        if not value.strip():
            self.note(field, "empty string")
        elif template and value.count("{}") != 1:
            self.note(field, f"{value!r} must contain exactly one '{{}}' for the subject")
        elif template and ("{" in value.replace("{}", "") or "}" in value.replace("{}", "")):
            self.note(field, f"{value!r} has braces besides '{{}}', which break format")
        return value


def read_all(path: str | pathlib.Path, records: Sequence[Any],
             parse: Callable[[FieldReader], Any], id_field: str | None = None
             ) -> tuple[Any, ...]:
    """`parse(FieldReader) -> item` over every record; raise once, in record order, if any
    field was malformed or (with `id_field`) an id repeats; an empty file is refused too."""
    if not records:
        raise DatasetError(path, message="the file holds no records (an empty list)")
    items, problems = [], duplicate_ids(list(records), id_field) if id_field else []
    for index, record in enumerate(records):
        reader = FieldReader(record, index)
        item = parse(reader) if isinstance(record, dict) else None
        problems.extend(reader.problems)
        items.append(item)
    if problems:
        raise DatasetError(path, sorted(problems, key=lambda p: p.index))
    return tuple(items)


def read_case_id(reader: FieldReader, field: str) -> int | str:
    """An integer or non-empty string id; placeholder 0 after a problem."""
    value = reader.raw(field, object)
    if field not in reader.record:
        return 0  # noted as missing
    if isinstance(value, bool) or not isinstance(value, int | str):
        reader.note(field, f"expected an integer or a string, got {type(value).__name__}")
        return 0
    if isinstance(value, str) and not value.strip():
        reader.note(field, "empty string")
    return value


def read_nested(reader: FieldReader, field: str, value: Any,
                parse: Callable[[FieldReader], T | None]) -> T | None:
    """`parse` on a nested object; its problems land in `reader` under the prefix `field`."""
    if not isinstance(value, dict):
        reader.note(field, f"expected an object, got {type(value).__name__}")
        return None
    inner = FieldReader(value, reader.index)
    result = parse(inner)
    for problem in inner.problems:
        reader.note(f"{field}.{problem.field}", problem.message)
    return result


def duplicate_ids(records: list[Any], field: str) -> list[FieldProblem]:
    """One problem per record whose id an earlier record already has."""
    first: dict[tuple[type, int | str], int] = {}
    problems = []
    for index, record in enumerate(records):
        value = record.get(field) if isinstance(record, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | str):
            continue  # malformed ids are reported by the parser
        key = (type(value), value)
        if key in first:
            problems.append(FieldProblem(index=index, field=field, message=(
                f"duplicate id {value!r} (first in record {first[key]})")))
        first.setdefault(key, index)
    return problems
