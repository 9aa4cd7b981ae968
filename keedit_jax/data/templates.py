"""Fixed context templates from a file (`--context_templates`): MEMIT-family code's published
format, a JSON list of template groups, e.g. `[["{}"], ["The man said. {}", "Therefore, {}"]]`.

The groups are flattened in order. The first template must be the bare "{}" (the clean prompt
the edited layer's outputs are read from, `methods.structured.edit_requests`): a file that does
not start with it is refused rather than completed, so a run uses exactly the listed templates
(an added "{}" would change the target loss's average and the keys'). A top-level string is
accepted as a one-template group. The keys are averaged as "{}" and then every later template
as one group (`methods.structured.template_weights`), which is the released compute_ks for the
two-group files MEMIT, AlphaEdit and LyapLock write; with more groups their per-group means
would weigh the templates differently.
"""

from __future__ import annotations

import json
import pathlib

from keedit_jax.data._fields import DatasetError, FieldProblem


def _template_problem(template: object) -> str | None:
    if not isinstance(template, str):
        return f"expected a string, got {type(template).__name__}"
    if template.count("{}") != 1:
        return f"{template!r} must contain exactly one '{{}}' (where the prompt goes)"
    if template.replace("{}", "", 1).count("{") or template.replace("{}", "", 1).count("}"):
        return f"{template!r} holds a brace besides its one '{{}}'"
    return None


def read_context_templates(path: str | pathlib.Path) -> tuple[str, ...]:
    """The flattened templates of a context-template file; DatasetError naming the file and
    each malformed entry (by its position, `[group][index]`) otherwise."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(path, message=f"cannot read JSON: {error}") from error
    if not isinstance(data, list) or not data:
        raise DatasetError(path, message="expected a non-empty JSON list of template groups "
                                         'like [["{}"], ["The man said. {}"]]')
    templates: list[str] = []
    problems: list[FieldProblem] = []
    for group_index, group in enumerate(data):
        entries = [(f"[{group_index}]", group)] if isinstance(group, str) else (
            [(f"[{group_index}][{i}]", t) for i, t in enumerate(group)]
            if isinstance(group, list) else None)
        if not entries:
            what = "an empty group" if entries == [] else f"a {type(group).__name__}"
            problems.append(FieldProblem(index=group_index, field=f"[{group_index}]",
                                         message=f"expected a list of template strings, got "
                                                 f"{what}"))
            continue
        for where, template in entries:
            problem = _template_problem(template)
            if problem:
                problems.append(FieldProblem(index=group_index, field=where, message=problem))
            else:
                templates.append(template)
    if problems:
        raise DatasetError(path, problems)
    if templates[0] != "{}":
        raise DatasetError(path, message=f"entry [0][0] is {templates[0]!r}: the first template "
                                         'must be the bare "{}" (the clean prompt); start the '
                                         'file with ["{}"] as MEMIT\'s does')
    return tuple(templates)
