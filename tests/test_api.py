"""The Python API edits as the command line does: from a fresh process, `keedit_jax.edit`
on the organism with a method's flagfile gives the same edited weights (==) as the command,
and `SequentialEditor` over three batches the same as the sequential stream."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Few steps and no generated templates: the same computation as the shipped flagfiles, cheaper.
FAST = ("--v_num_grad_steps=4", "--context_seeds=", "--max_new_tokens=4")

# Each notebook cell as a user writes it: the organism, its records, one method's settings.
NOTEBOOK = """
import json, sys
import numpy as np
import keedit_jax as ke
from keedit_jax.models import down_proj_path, get_path

model = ke.load("organism:small")
records = ke.read_records(model.path / "benchmarks" / {file!r})
records = [r for r in records if str(r.case_id) in {case_ids!r}]
hparams = {{**ke.hparams_from_flagfile({flagfile!r}), **{overrides!r}}}
{body}
kernels = {{name: np.asarray(get_path(p, down_proj_path(model.config)))
           for name, p in (("layer", params), ("unedited", model.params))}}
np.savez({out!r}, **{{f"{{name}}_{{i}}": k[i] for name, k in kernels.items()
                     for i in range(k.shape[0])}})
"""
ONE_TIME = """
result = ke.edit(model, records, method={method!r}, **hparams)
params = result.params
"""
SEQUENTIAL = """
editor = ke.SequentialEditor(model, method={method!r}, **hparams)
for start in range(0, len(records), {batch}):
    editor.edit(records[start:start + {batch}])
params = editor.params
"""


def _env(cache: pathlib.Path) -> dict[str, str]:
    return {**os.environ, "KEEDIT_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}


def _cli(cache: pathlib.Path, out: pathlib.Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "keedit_jax.main", *args, *FAST,
                             f"--output_dir={out}"], cwd=ROOT, env=_env(cache),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _notebook(cache: pathlib.Path, out: pathlib.Path, body: str, **fields: object) -> dict:
    """Run the API in a fresh Python process; the edited down-projection kernels."""
    script = NOTEBOOK.format(body=body.format(**fields), out=str(out), **fields)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(cache),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out))


def _overrides(args: tuple[str, ...]) -> dict[str, object]:
    """The FAST flags as API keyword arguments."""
    out: dict[str, object] = {}
    for arg in args:
        name, value = arg.removeprefix("--").split("=", 1)
        out[name] = int(value) if value.isdigit() else value
    return out


def _assert_same_layers(cli: pathlib.Path, api: dict) -> None:
    """Every layer the command edited is bit-for-bit the API's, and was changed."""
    edited = load_file(cli / "edited_layers.safetensors")
    assert edited, "the command wrote no edited layers"
    for name, kernel in edited.items():
        np.testing.assert_array_equal(api[name], kernel, err_msg=name)
        assert not np.array_equal(api[name.replace("layer", "unedited")], kernel), name


@pytest.mark.parametrize("method, flagfile, file, extra", [
    ("memit", "configs/memit.cfg", "counterfact.json", ("--num_edits=3", "--edit_batch_size=3")),
    pytest.param("alphaedit", "configs/alphaedit.cfg", "counterfact.json",
                 ("--num_edits=3", "--edit_batch_size=3"), marks=pytest.mark.slow),
    pytest.param("anyedit", "configs/anyedit.cfg", "unkebench.json", ("--num_edits=1",),
                 marks=pytest.mark.slow),
    pytest.param("muke", "configs/muke.cfg", "unkebench.json", ("--num_edits=1",),
                 marks=pytest.mark.slow),
    pytest.param("ft_m", "configs/ft_m.cfg", "counterfact.json",
                 ("--num_edits=3", "--edit_batch_size=3"), marks=pytest.mark.slow),
])
def test_edit_gives_the_weights_of_the_command_line(tmp_path, method, flagfile, file, extra):
    cache = tmp_path / "cache"
    results = _cli(cache, tmp_path / "cli", f"--flagfile={flagfile}", *extra)
    case_ids = results.get("case_ids") or [str(c["case_id"]) for c in results["cases"]]
    overrides = _overrides(FAST)
    overrides.pop("max_new_tokens")
    api = _notebook(cache, tmp_path / "api.npz", ONE_TIME, method=method, flagfile=flagfile,
                    file=file, case_ids=case_ids, overrides=overrides)
    _assert_same_layers(tmp_path / "cli", api)


@pytest.mark.slow
def test_sequential_editor_gives_the_weights_of_the_stream(tmp_path):
    cache = tmp_path / "cache"
    stream = ("--flagfile=configs/memit_seq.cfg", "--model=organism:small", "--num_edits=3",
              "--edit_batch_size=1", "--eval_every=3", "--drift_samples=2")
    _cli(cache, tmp_path / "cli", *stream)
    overrides = _overrides(FAST)
    overrides.pop("max_new_tokens")
    case_ids = [str(i) for i in range(3)]
    api = _notebook(cache, tmp_path / "api.npz", SEQUENTIAL, method="memit_seq", batch=1,
                    flagfile="configs/memit_seq.cfg", file="counterfact.json",
                    case_ids=case_ids, overrides=overrides)
    _assert_same_layers(tmp_path / "cli", api)


# ---------------------------------------------------------------- the API's input, no model


def test_requests_from_dicts_records_and_readers_types():
    from keedit_jax import api
    from keedit_jax.data import LongFormRecord, Request

    structured = api.as_requests([{"prompt": "{} is in", "subject": "Rome", "target": " Italy"},
                                  Request(case_id="r", prompt="{} is", subject="A",
                                          target_new=" B")])
    assert structured[0] == Request(case_id=0, prompt="{} is in", subject="Rome",
                                    target_new=" Italy")
    assert structured[1].case_id == "r"
    longform = api.as_requests([{"question": "Who?", "answer": "A long answer.",
                                 "sub_questions": ["Q?"], "sub_answers": ["A."],
                                 "case_id": 7}])
    assert longform == [LongFormRecord(case_id=7, question="Who?", answer="A long answer.",
                                       sub_questions=("Q?",), sub_answers=("A.",))]
    with pytest.raises(ValueError, match="request 0: missing subject"):
        api.as_requests([{"prompt": "{} is", "target": " B"}])
    with pytest.raises(ValueError, match="mixes structured and long-form"):
        api.as_requests([structured[0], longform[0]])
    with pytest.raises(ValueError, match="exactly one"):
        api.as_requests([{"prompt": "no slot", "subject": "A", "target": " B"}])
    with pytest.raises(TypeError, match="request 0: a dict"):
        api.as_requests(["Rome is in Italy"])


def test_hyperparameters_are_the_flags_names_and_defaults():
    from keedit_jax import api, flags

    chosen = api.settings("muke", {"v_lr": 0.5, "window_size": 2, "seed": 3})
    assert chosen.structured == flags.StructuredFlags(v_lr=0.5)
    assert chosen.longform == flags.LongFormFlags(window_size=2)
    assert chosen.seed == 3 and chosen.max_new_tokens == flags.RunFlags().max_new_tokens
    with pytest.raises(TypeError, match="unknown hyperparameter 'v_learning_rate'"):
        api.settings("memit", {"v_learning_rate": 0.1})
    with pytest.raises(ValueError, match="--v_num_grad_steps must be >= 1"):
        api.settings("memit", {"v_num_grad_steps": 0})
    with pytest.raises(ValueError, match="unknown method 'rome2'"):
        api.settings("rome2", {})


def test_a_flagfile_gives_its_hyperparameters_nested_files_included(tmp_path):
    from keedit_jax import api

    base = tmp_path / "base.cfg"
    base.write_text("--model=organism:small\n--v_lr=0.25\n--layers=1,2\n")
    child = tmp_path / "child.cfg"
    child.write_text(f"--flagfile={base}\n--v_lr=0.5\n--num_edits=3\n--seed=4\n")
    assert api.hparams_from_flagfile(child) == {"v_lr": 0.5, "layers": "1,2", "seed": 4}


def test_edit_refuses_requests_of_another_protocol():
    from keedit_jax import api

    fake = api.LoadedModel(config=None, params={}, hf_config={}, path=pathlib.Path("."))
    request = {"prompt": "{} is in", "subject": "Rome", "target": " Italy"}
    with pytest.raises(ValueError, match="use SequentialEditor"):
        api.edit(fake, [request], method="memit_seq")
    with pytest.raises(ValueError, match="muke edits long-form texts"):
        api.edit(fake, [request], method="muke")
    with pytest.raises(ValueError, match="rome edits structured requests"):
        api.edit(fake, [{"question": "Who?", "answer": "A long answer."}], method="rome")
