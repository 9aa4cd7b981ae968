"""The command line refuses bad input with one clear line naming what is wrong, before any
model is loaded or trained, and writes nothing when it fails."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args: str, cache: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KEEDIT_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "keedit_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"


def model_directory(tmp_path: pathlib.Path, checkpoint: pathlib.Path,
                    tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A --model directory: the tiny checkpoint and the tiny tokenizer side by side."""
    model = tmp_path / "model"
    model.mkdir()
    for source in (checkpoint, tokenizer_dir):
        for file in source.iterdir():
            (model / file.name).write_bytes(file.read_bytes())
    return model


def varied_text(tmp_path: pathlib.Path, words: str) -> pathlib.Path:
    """A --stats_source text of 64 random 16-word documents, so E[kkᵀ] has full rank."""
    import numpy as np

    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words.split(), 16)) for _ in range(64)))
    return text


def test_unknown_method(tmp_path):
    assert_clean_error(run_main("--method=no_such_method", cache=tmp_path),
                       "--method='no_such_method' is unknown")


def test_every_method_has_a_runner():
    from keedit_jax.flags import METHODS
    from keedit_jax.methods import REGISTRY

    assert set(REGISTRY) == set(METHODS)


def test_missing_and_malformed_flagfiles(tmp_path):
    assert_clean_error(run_main("--flagfile=nope.cfg", cache=tmp_path),
                       "flagfile nope.cfg does not exist")
    bad = tmp_path / "bad.cfg"
    bad.write_text("# comment\n--method=memit\nnum_edits=3\n")
    assert_clean_error(run_main(f"--flagfile={bad}", cache=tmp_path), f"{bad}:3",
                       "is not a flag")
    bad.write_text("--method=memit\n--no_such_flag=1\n")
    assert_clean_error(run_main(f"--flagfile={bad}", cache=tmp_path), f"{bad}:2",
                       "unknown flag --no_such_flag")


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(run_main("--method=memit", f"--output_dir={blocker}/out",
                                cache=tmp_path), "is not writable")


def test_dataset_in_the_wrong_format_names_file_record_and_field(tmp_path, tiny_checkpoint,
                                                                   tiny_tokenizer_dir):
    model = model_directory(tmp_path, tiny_checkpoint("llama"), tiny_tokenizer_dir)
    dataset = tmp_path / "cf.json"
    record = {"case_id": 0, "requested_rewrite": {"prompt": "{} was born in", "subject": "A",
                                                  "target_new": {"str": "X"},
                                                  "target_true": {"str": "Y"}},
              "paraphrase_prompts": [], "neighborhood_prompts": [],
              "attribute_prompts": [], "generation_prompts": []}
    broken = json.loads(json.dumps(record))
    del broken["requested_rewrite"]["subject"]
    dataset.write_text(json.dumps([record, broken]))
    out = tmp_path / "out"
    result = run_main(f"--model={model}", "--method=memit", f"--dataset={dataset}",
                      "--dataset_format=counterfact", "--layers=0,1", f"--output_dir={out}",
                      cache=tmp_path)
    assert_clean_error(result, str(dataset), "record 1", "subject")
    assert not out.exists()  # created by the run, empty: removed

    (out / "results.json").parent.mkdir()
    (out / "results.json").write_text("{}")  # an earlier run's
    refused = run_main(f"--model={model}", "--method=memit", f"--dataset={dataset}",
                       f"--output_dir={out}", cache=tmp_path)
    assert_clean_error(refused, f"--output_dir={out} already holds results.json", "--overwrite")
    replaced = run_main(f"--model={model}", "--method=memit", f"--dataset={dataset}",
                        "--dataset_format=counterfact", "--layers=0,1", f"--output_dir={out}",
                        "--overwrite", cache=tmp_path)
    assert_clean_error(replaced, "record 1")  # past the check, to the dataset
    assert (out / "results.json").read_text() == "{}"  # an existing directory is kept


@pytest.mark.parametrize("flag", ["--num_edits=0", "--layers=2,1", "--dtype=float8",
                                  "--v_num_grad_steps=0", "--max_new_tokens=-1", "--v_lr=-0.5",
                                  "--clamp_norm_factor=0", "--unke_steps=0",
                                  "--lyaplock_alpha=-1"])
def test_invalid_flag_values(tmp_path, flag):
    """Refused before any model is loaded (the output directory is not even created)."""
    out = tmp_path / "out"
    result = run_main("--method=memit", flag, f"--output_dir={out}", cache=tmp_path)
    assert_clean_error(result, flag.split("=")[0])
    assert not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (("--method=muke", "--dataset_format=counterfact"), "is a structured format"),
    (("--method=muke", "--dataset_format=unkebench", "--categories=news"),
     "--categories selects EditEverything categories"),
])
def test_a_format_the_method_cannot_read_is_refused_first(tmp_path, flags, message):
    assert_clean_error(run_main(*flags, cache=tmp_path), message)


def test_consistency_needs_both_files(tmp_path):
    snippets = tmp_path / "attribute_snippets.json"
    snippets.write_text("[]")
    assert_clean_error(run_main("--method=memit", f"--attribute_snippets={snippets}",
                                cache=tmp_path), "needs both --attribute_snippets and --tfidf_dir")


@pytest.mark.parametrize("flagfile", sorted(str(p.relative_to(ROOT))
                                            for p in (ROOT / "configs").rglob("*.cfg")))
def test_every_flagfile_parses_into_valid_configs_of_an_implemented_method(flagfile,
                                                                            monkeypatch):
    from absl import flags as absl_flags

    from keedit_jax import flags as run_flags
    from keedit_jax.methods import get_method
    from keedit_jax.models import gguf

    monkeypatch.chdir(ROOT)  # nested --flagfile= lines are relative to the repository
    values = absl_flags.FlagValues()
    run_flags.define_flags(flag_values=values)
    run_flags.check_flagfiles(["main", f"--flagfile={flagfile}"], values)
    values(["main", f"--flagfile={flagfile}"])
    if flagfile.startswith("configs/real") and not pathlib.Path(values.dataset).is_file():
        pytest.skip(f"{flagfile} reads {values.dataset}, the shared data beside a clone")
    named = gguf.NAMED_MODELS.get(values.model)
    if named is not None and importlib.util.find_spec(named.package) is None:
        pytest.skip(f"{flagfile} edits {values.model}, shipped by {named.package}: not installed")
    configs = {group: run_flags.from_flags(group, values) for group in run_flags.FLAG_GROUPS}
    get_method(configs[run_flags.EditFlags].method)
