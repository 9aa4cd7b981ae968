"""The published config.json of every checkpoint our families cover loads (bookkeeping keys
accepted), and every key or value that would change the computation and that we do not
implement is refused with the key named."""

from __future__ import annotations

import json
import pathlib

import pytest

from keedit_jax.models import ConfigError, config_from_hf, read_hf_config
from keedit_jax.testing import PUBLISHED_CONFIGS

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FIXTURE = {k: v for k, v in json.loads((FIXTURES / "published_configs.json").read_text()).items()
           if not k.startswith("_")}
SOURCES = {k: v for k, v in
           json.loads((FIXTURES / "published_configs_sources.json").read_text()).items()
           if not k.startswith("_")}
PUBLISHED = {**FIXTURE, **PUBLISHED_CONFIGS}
SMOLLM2 = PUBLISHED["HuggingFaceTB/SmolLM2-135M-Instruct"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_load(name):
    hf = PUBLISHED[name]
    cfg = config_from_hf(hf, name)
    assert cfg.n_layers == hf.get("num_hidden_layers", hf.get("n_layer"))
    assert cfg.vocab_size == hf["vocab_size"]


def test_every_fixture_config_says_where_it_was_read():
    """A config is 'verified' only with a recorded verbatim source; the rest say they are not."""
    assert set(SOURCES) == set(FIXTURE)
    for name, record in SOURCES.items():
        assert record["status"] in ("verified", "unverified: reconstructed"), name
        assert record["status"] != "verified" or record["sources"], name


def test_values_are_read_not_just_accepted():
    cfg = config_from_hf(SMOLLM2)
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == \
        (576, 9, 3, 64, 1536)
    assert cfg.tie_embeddings and cfg.rope.theta == 100000 and cfg.rope.style == "half"
    llama31 = config_from_hf(PUBLISHED["meta-llama/Llama-3.1-8B-Instruct"])
    assert llama31.rope.scaling == "llama3" and llama31.eos_token_ids == (128001, 128008, 128009)
    assert config_from_hf(PUBLISHED["mistralai/Mistral-7B-v0.1"]).sliding_window == 4096
    assert config_from_hf(PUBLISHED["Qwen/Qwen2.5-0.5B-Instruct"]).sliding_window is None


def test_conversion_bookkeeping_is_accepted():
    """What a standard GGUF->HF conversion adds (the keys that were refused before)."""
    config_from_hf({**SMOLLM2, "unk_token_id": 0, "_model_name_or_path": "model.gguf"})


@pytest.mark.parametrize(("base", "change", "key"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"rope_interleaved": True}, "rope_interleaved"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"qk_layer_norms": True}, "qk_layer_norms"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"quantization_config": {"bits": 4}},
     "quantization_config"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"sliding_window": 4096}, "sliding_window"),
    ("Qwen/Qwen2.5-0.5B", {"use_mrope": True}, "use_mrope"),
    ("Qwen/Qwen2.5-0.5B-Instruct",
     {"rope_scaling": {"type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 32768}}, "rope scaling"),
    ("meta-llama/Llama-3.2-1B", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("gpt2-medium", {"scale_attn_by_inverse_layer_idx": True},
     "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"add_cross_attention": True}, "add_cross_attention"),
    ("EleutherAI/gpt-j-6b", {"hidden_act": "relu", "activation_function": "swiglu"},
     "swiglu"),
])
def test_computation_changing_keys_are_refused_by_name(base, change, key):
    with pytest.raises(ConfigError, match=key):
        config_from_hf({**PUBLISHED[base], **change}, base)


@pytest.mark.parametrize(("base", "change", "message"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"hidden_size": None},
     "the required key 'hidden_size' is missing"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"num_hidden_layers": "four"},
     "num_hidden_layers='four' must be a positive integer"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"num_attention_heads": 0},
     "num_attention_heads=0 must be a positive integer"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", {"num_key_value_heads": 0},
     "num_key_value_heads=0 must be a positive integer"),
    ("gpt2", {"n_embd": 76.5}, "n_embd=76.5 must be a positive integer"),
    ("EleutherAI/gpt-j-6b", {"n_layer": True}, "n_layer=True must be a positive integer"),
])
def test_missing_or_impossible_sizes_are_named(base, change, message):
    hf = {k: v for k, v in {**PUBLISHED[base], **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=f"^{base}: {message}".replace("(", r"\(")):
        config_from_hf(hf, base)


def test_a_config_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: a config must be a JSON object, got a "
                                          "list"):
        read_hf_config(tmp_path)
