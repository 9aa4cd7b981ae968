"""Checkpoint I/O: our exports load in transformers unchanged (plain and edited), and every
malformed checkpoint is refused with a message that names the file and the tensor or field."""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keedit_jax import intervene, testing
from keedit_jax.models import (
    CheckpointError,
    ConfigError,
    down_proj_path,
    get_path,
    load_model,
    save_model,
    set_path,
)
from keedit_jax.models import checkpoint as checkpoint_module
from keedit_jax.models.tokenizer import TokenizerMismatchError, load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = testing.FAMILIES
LENGTHS = (12, 5, 9)
SMALL_SHARD = 20_000  # bytes: splits every tiny model into several shards


def torch_from_export(directory):
    """transformers' own loader on our export; any missing or unexpected key fails here."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers loading {directory}: {problems}"
    return model.eval()


def torch_logits(model, batch):
    tokens, mask, positions = batch
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        ).logits.numpy()


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(directory / shard).items()}


def copy_checkpoint(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target)
    return target


def edit_config(directory: pathlib.Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- export round trip ---------------------------------------------------------------------

LAYOUTS = {"single": {}, "sharded": {"max_shard_bytes": SMALL_SHARD}, "bf16": {"dtype": "bfloat16"}}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_and_reproduces_logits(
    family, layout, tiny_checkpoint, tmp_path
):
    source = tiny_checkpoint(family)
    model = testing.cached_model(source)
    out = save_model(
        tmp_path / "export", model.config, model.params, model.hf_config, **LAYOUTS[layout]
    )
    written = read_tensors(out)
    if layout == "sharded":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert set(index["weight_map"]) == set(written)
        assert not (out / "model.safetensors").exists()
    # The tensors written are the source file's, key for key (ties stored once, as HF does).
    original = read_tensors(source)
    assert set(written) == set(original)
    dtype = ml_dtypes.bfloat16 if layout == "bf16" else np.float32
    testing.assert_trees_equal(written, {k: v.astype(dtype) for k, v in original.items()})

    batch = tokens, mask, _ = testing.left_padded_batch()
    expected = torch_logits(torch_from_export(out), batch)
    # fp32: our model of the source; bf16: ours of the export, against torch of the same file.
    params = model.params if layout != "bf16" else load_model(out).params
    logits = intervene.forward_jit(params, model.config, tokens, mask)
    testing.assert_trees_close(
        testing.real_tokens(logits, mask), testing.real_tokens(expected, mask), atol=1e-5
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_edited_down_projection_round_trips(family, tiny_checkpoint, tmp_path):
    model = testing.cached_model(tiny_checkpoint(family))
    cfg = model.config
    kernel = get_path(model.params, down_proj_path(cfg))  # [L, F, D]
    assert kernel.shape == (cfg.n_layers, cfg.d_ff, cfg.d_model)
    rng = np.random.default_rng(5)
    u = rng.standard_normal(cfg.d_ff).astype(np.float32)
    v = rng.standard_normal(cfg.d_model).astype(np.float32)
    edited = set_path(model.params, down_proj_path(cfg), kernel.at[1].add(0.1 * jnp.outer(u, v)))
    batch = tokens, mask, _ = testing.left_padded_batch()
    logits = intervene.forward_jit(edited, cfg, tokens, mask)
    before = intervene.forward_jit(model.params, cfg, tokens, mask)
    assert (
        np.abs(testing.real_tokens(logits, mask) - testing.real_tokens(before, mask)).max() > 1e-2
    )

    out = save_model(tmp_path / "edited", cfg, edited, model.hf_config)
    expected = torch_logits(torch_from_export(out), batch)
    testing.assert_trees_close(
        testing.real_tokens(logits, mask), testing.real_tokens(expected, mask), atol=1e-5
    )
    testing.assert_trees_equal(load_model(out).params, edited)


def test_export_copies_tokenizer_files(tiny_checkpoint, tiny_tokenizer_dir, tmp_path):
    # Not qwen2: next to a qwen2 config.json, transformers 5 reads the tiny tokenizer (whose
    # class is the generic TokenizersBackend) as a Qwen2Tokenizer, which adds <|endoftext|> as
    # id 160, one past the tiny embedding, and load_tokenizer rightly refuses it.
    model = testing.cached_model(tiny_checkpoint("llama"))
    out = save_model(
        tmp_path / "export",
        model.config,
        model.params,
        model.hf_config,
        copy_from=tiny_tokenizer_dir,
    )
    tokenizer = load_tokenizer(out, model.config)
    original = load_tokenizer(tiny_tokenizer_dir)
    text = "The capital of Italy is Rome."
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template


# --- save_model is all or nothing ----------------------------------------------------------


def test_save_model_refuses_to_overwrite(tiny_checkpoint, tmp_path):
    model = testing.cached_model(tiny_checkpoint("gpt2"))
    out = save_model(tmp_path / "export", model.config, model.params, model.hf_config)
    before = (out / "model.safetensors").read_bytes()
    doubled = jax.tree.map(lambda x: 2 * x, model.params)
    with pytest.raises(FileExistsError, match=str(out)):
        save_model(out, model.config, doubled, model.hf_config)
    assert (out / "model.safetensors").read_bytes() == before
    save_model(out, model.config, doubled, model.hf_config, overwrite=True)
    testing.assert_trees_equal(load_model(out).params, doubled)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_save_leaves_nothing_half_written(existing, tiny_checkpoint, tmp_path, monkeypatch):
    model = testing.cached_model(tiny_checkpoint("llama"))
    out = tmp_path / "export"
    if existing:
        save_model(out, model.config, model.params, model.hf_config)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    calls = []
    real_save_file = checkpoint_module.save_file

    def fail_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", fail_on_second_shard)
    doubled = jax.tree.map(lambda x: 2 * x, model.params)
    with pytest.raises(OSError, match="simulated"):
        save_model(
            out,
            model.config,
            doubled,
            model.hf_config,
            max_shard_bytes=SMALL_SHARD,
            overwrite=existing,
        )
    assert len(calls) == 2  # it did fail mid-way, after one shard was written
    assert sorted(p.name for p in tmp_path.iterdir()) == (["export"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- malformed checkpoints -----------------------------------------------------------------


def test_missing_tensor_names_file_and_tensor(tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    assert "model.safetensors" in str(err.value)
    assert "missing tensors" in str(err.value)
    assert "model.layers.1.mlp.down_proj.weight" in str(err.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_non_finite_weight_is_named_at_load(dtype, tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("llama", dtype), tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    damaged = tensors["model.layers.1.self_attn.o_proj.weight"].copy()
    damaged[2, 3], damaged[0, 0] = np.nan, np.inf
    tensors["model.layers.1.self_attn.o_proj.weight"] = damaged
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\."
                                              r"self_attn\.o_proj\.weight' holds 2 non-finite"):
        load_model(directory)
    loaded = load_model(directory, check_finite=False)  # the check can be skipped
    kernel = loaded.params["model"]["layers"]["self_attn"]["o_proj"]["kernel"]
    assert np.isnan(np.asarray(kernel, np.float32)).sum() == 1


def test_unexpected_tensor_names_file_and_tensor(tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("gptj"), tmp_path / "ckpt")
    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.h.0.mlp.fc_mid.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: unexpected tensor "
        r"'transformer\.h\.0\.mlp\.fc_mid\.weight'",
    ):
        load_model(directory)


def test_shape_mismatch_names_file_tensor_and_shapes(tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    edit_config(directory, intermediate_size=100)
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    message = str(err.value)
    assert (
        "model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape "
        "(64, 96), config.json implies (64, 100)"
    ) in message


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers_loads(tiny_checkpoint, tmp_path):
    """GPT-2 files on the hub lack the `transformer.` prefix and carry attn.bias buffers."""
    source = tiny_checkpoint("gpt2")
    directory = copy_checkpoint(source, tmp_path / "ckpt")
    tensors = {
        k.removeprefix("transformer."): v
        for k, v in load_file(directory / "model.safetensors").items()
    }
    assert "h.0.attn.c_attn.weight" in tensors
    for index in range(3):
        tensors[f"h.{index}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    testing.assert_trees_equal(load_model(directory).params, testing.cached_model(source).params)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "falcon"}, "unsupported model_type 'falcon'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
        (
            {
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "rope_theta": 500000.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "'rope_type': 'yarn'",
        ),
        # transformers-4 style: rope_theta + rope_scaling with "type".
        (
            {
                "rope_parameters": None,
                "rope_theta": 500000.0,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
            },
            "'rope_type': 'dynamic'",
        ),
    ],
    ids=["model_type", "unknown_key", "yarn", "dynamic"],
)
def test_unsupported_config_names_file_and_field(change, field, tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    edit_config(directory, **change)
    with pytest.raises(ConfigError) as err:
        load_model(directory)
    assert str(directory / "config.json") in str(err.value)
    assert field in str(err.value)


def test_pickle_only_checkpoint_is_refused_unread(tiny_checkpoint, tmp_path, monkeypatch):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    shutil.copy(tiny_checkpoint("llama") / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle, and never to be read")

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    assert "pytorch_model.bin" in str(err.value) and str(directory) in str(err.value)
    assert "never unpickles" in str(err.value)


def test_corrupt_safetensors_names_the_file(tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("mistral"), tmp_path / "ckpt")
    file = directory / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{file}: not a readable safetensors file"):
        load_model(directory)


def test_index_naming_a_missing_shard_is_refused(tiny_checkpoint, tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("qwen2", sharded=True), tmp_path / "ckpt")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(directory)
    assert "model.safetensors.index.json" in str(err.value)
    assert shards[-1].name in str(err.value)


def test_tokenizer_larger_than_embedding_is_refused(tiny_tokenizer_dir, tmp_path):
    directory = testing.save_tiny_hf_model("llama", tmp_path / "small-vocab", vocab_size=100)
    cfg = load_model(directory).config
    assert cfg.vocab_size == 100
    with pytest.raises(TokenizerMismatchError) as err:
        load_tokenizer(tiny_tokenizer_dir, cfg, checkpoint=directory)
    message = str(err.value)
    for part in (
        str(tiny_tokenizer_dir),
        str(directory),
        "model.embed_tokens.weight",
        "only 100 rows",
        "up to 159",
    ):
        assert part in message, part


def test_a_tokenizer_needing_remote_code_is_refused_by_us(tiny_tokenizer_dir, tmp_path):
    directory = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerMismatchError) as err:
        load_tokenizer(directory)
    message = str(err.value)
    assert "tokenizer_config.json: field 'auto_map'" in message
    assert "never runs code" in message and "trust_remote_code=True" not in message


def test_a_tokenizer_of_another_checkpoint_is_told_by_its_bos(tiny_checkpoint, tiny_tokenizer_dir,
                                                             tmp_path):
    directory = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "ckpt")
    tokenizer = load_tokenizer(tiny_tokenizer_dir, load_model(directory).config)  # its own: fine
    edit_config(directory, bos_token_id=tokenizer.bos_token_id + 1)
    with pytest.raises(TokenizerMismatchError, match=(
            rf"begins sequences with id {tokenizer.bos_token_id} .*bos_token_id="
            rf"{tokenizer.bos_token_id + 1}: this tokenizer does not belong")):
        load_tokenizer(tiny_tokenizer_dir, load_model(directory).config, checkpoint=directory)
