"""Sharding: the same functions on a mesh equal their one-device results, checkpoints load
straight into each device's block, two jax.distributed processes complete an edit, and a
layout that cannot run is refused before anything is loaded.

The multi-device checks run in subprocesses: JAX fixes its device count when it starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from keedit_jax import parallel
from keedit_jax.models import config_from_hf, read_hf_config
from keedit_jax.testing import published_config
from tests.test_main import ROOT, assert_clean_error, model_directory, run_main
from tests.test_unstructured import REQUESTS, TEXTS, _unkebench


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_checkpoint, tiny_tokenizer_dir) -> pathlib.Path:
    """The tiny llama in many safetensors shards, with the tiny tokenizer beside it."""
    return model_directory(tmp_path_factory.mktemp("parallel"),
                           tiny_checkpoint("llama", sharded=True), tiny_tokenizer_dir)


def _tiny_config(model_dir: pathlib.Path):
    return config_from_hf(read_hf_config(model_dir), str(model_dir))


# ---------------------------------------------------------------- layouts, on one device


def test_mesh_axes_fill_the_devices_and_refuse_what_does_not_divide():
    assert parallel.MeshConfig().shape(8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parallel.MeshConfig(data=2, tensor=2).shape(8) == {"data": 2, "fsdp": 2,
                                                              "tensor": 2}
    with pytest.raises(parallel.MeshError, match="does not divide the 8 devices"):
        parallel.MeshConfig(tensor=3).shape(8)
    with pytest.raises(parallel.MeshError, match="has 4 devices, but there are 8"):
        parallel.MeshConfig(data=2, fsdp=2).shape(8)
    with pytest.raises(parallel.MeshError, match="only one mesh axis may be -1"):
        parallel.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(parallel.MeshError, match="--mesh_tensor=0"):
        parallel.MeshConfig(tensor=0)
    with pytest.raises(parallel.MeshError, match="--partitioner='auto'"):
        parallel.MeshConfig(partitioner="auto")


def test_partition_rules_split_every_kernel_of_every_family(tiny_checkpoint):
    """Every stacked kernel is split (none silently replicated), the down projection by
    rows over tensor and columns over fsdp, norms replicated."""
    for family in ("llama", "qwen2", "gpt2", "gptj"):
        cfg = _tiny_config(tiny_checkpoint(family))
        flat = jax.tree_util.tree_flatten_with_path(
            parallel.param_specs(cfg), is_leaf=lambda x: isinstance(x, P))[0]
        specs = {"/".join(k.key for k in path): spec for path, spec in flat}
        kernels = {name: spec for name, spec in specs.items() if name.endswith("kernel")}
        assert all(spec != P() for spec in kernels.values()), (family, kernels)
        down = next(s for n, s in kernels.items() if n.endswith(("down_proj/kernel",
                                                                 "mlp/c_proj/kernel",
                                                                 "fc_out/kernel")))
        assert down == P(None, "tensor", "fsdp"), family
        assert all(spec == P() for name, spec in specs.items() if name.endswith("scale"))


def test_check_mesh_names_every_dimension_that_does_not_divide():
    cfg = published_config("Llama-3-8B")
    parallel.check_mesh(cfg, {"data": 1, "fsdp": 8, "tensor": 1})  # v5e-8, fsdp
    parallel.check_mesh(cfg, {"data": 1, "fsdp": 4, "tensor": 2})
    with pytest.raises(parallel.MeshError) as err:
        parallel.check_mesh(cfg, {"data": 1, "fsdp": 1, "tensor": 3})
    message = str(err.value)
    assert "model/layers/mlp/down_proj/kernel dim 1 = 14336 is not divisible by tensor = 3" \
        in message
    assert "the statistics' rows (d_ff) = 14336" in message
    assert "self_attn/k_proj/kernel dim 2 = 1024" in message


def test_distributed_arguments_are_checked_before_starting():
    with pytest.raises(parallel.MeshError, match="--process_id=2 is outside"):
        parallel.DistributedConfig(num_processes=2, process_id=2)
    with pytest.raises(parallel.MeshError, match="needs --num_processes and --process_id"):
        parallel.DistributedConfig(coordinator_address="localhost:1234")
    parallel.DistributedConfig()  # everything from the environment (TPU pods)


def test_helpers_do_nothing_without_a_mesh():
    x = np.arange(6.0).reshape(3, 2)
    assert parallel.active_mesh() is None and parallel.batch_multiple() == 1
    assert parallel.put_rows(x).shape == (3, 2)
    np.testing.assert_array_equal(parallel.to_host({"a": parallel.put(x, P("data"))})["a"], x)
    with parallel.use_mesh(parallel.make_mesh(parallel.MeshConfig())):  # one device
        assert parallel.active_mesh() is None


def test_command_line_refuses_a_bad_layout_before_loading(tmp_path, tiny_model_dir):
    """Errors name the flags; the model path does not even exist for the first two."""
    missing = f"--model={tmp_path / 'nowhere'}"
    assert_clean_error(run_main("--method=muke", missing, "--mesh_tensor=3", cache=tmp_path),
                       "--mesh_tensor", "does not divide the 1 devices")
    assert_clean_error(run_main("--method=muke", missing, "--num_processes=2", cache=tmp_path),
                       "need --distributed")
    assert_clean_error(run_main("--method=muke", missing, "--distributed",
                                "--coordinator_address=localhost:1", cache=tmp_path),
                       "needs --num_processes and --process_id")


# ---------------------------------------------------------------- 8 host devices


@pytest.fixture(scope="module")
def sharded_report(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("worker") / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.parallel_worker", str(tiny_model_dir), str(out),
         "--devices=8", "--mesh=2,2,2"], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_sharded_forward_statistics_and_muke_edit_equal_one_device(sharded_report):
    """On data=2 × fsdp=2 × tensor=2 (edit rows split over data × fsdp, parameters loaded
    sharded): logits and Σ k kᵀ of two layers equal the one-device run to 1e-5 (the sums
    relative to their scale of ~600), the μKE-edited down projections to 3e-5: the edit's
    Adam steps (25 per window stage, normalised updates) carry float32 reduction-order
    differences into δ; measured 1.07e-5 with vmap'd figure gradients and 1.20e-5 with the
    default per-figure backward passes, on fine-bucket padding (below 1e-5 before it)."""
    report = sharded_report
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    error = report["max_abs"]
    assert error["logits"] < 1e-5 and error["down_proj"] < 3e-5 and error["delta"] < 3e-5
    assert report["scale"]["delta"] > 0.1  # the edit changed the weights
    for name in ("sum_ff_0", "sum_ff_1"):
        assert error[name] / report["scale"][name] < 1e-5


def test_parameters_are_loaded_as_each_devices_block(sharded_report):
    layouts = sharded_report["layouts"]  # tiny llama: L=3, d_model 64, d_ff 96, kv 48
    assert layouts["model/layers/mlp/down_proj/kernel"] == ["P(None, 'tensor', 'fsdp')",
                                                            [[3, 48, 32]]]
    assert layouts["model/layers/self_attn/k_proj/kernel"] == ["P(None, 'fsdp', 'tensor')",
                                                               [[3, 32, 24]]]
    assert layouts["model/embed_tokens/embedding"] == ["P(None, ('fsdp', 'tensor'))",
                                                       [[160, 16]]]
    assert layouts["model/norm/scale"] == ["P()", [[64]]]


# ---------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # 60-120 s on 2 cores: both processes compile the same programs at once
def test_two_processes_complete_an_edit_equal_to_one(tmp_path, tiny_model_dir):
    """Two jax.distributed processes on localhost, two CPU devices each (fsdp=4 across both):
    each reads half the checkpoint, they edit, and process 0 writes results whose generated
    answers equal a one-process run's."""
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    dataset = tmp_path / "unke.json"
    dataset.write_text(json.dumps(_unkebench(REQUESTS[1].answer, "Who was Marie Curie?")[:1]))
    common = [sys.executable, "-m", "keedit_jax.main", f"--model={tiny_model_dir}",
              "--method=muke", f"--dataset={dataset}", "--dataset_format=unkebench",
              "--layers=0,1", "--window_size=6", f"--stats_source={text}",
              "--stats_samples=16", "--max_new_tokens=8"]
    env = {**os.environ, "KEEDIT_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "JAX_NUM_CPU_DEVICES": "2"}
    address = f"localhost:{_free_port()}"
    workers = [subprocess.Popen(
        [*common, f"--output_dir={tmp_path / 'two'}", "--distributed",
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={rank}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    logs = [worker.communicate(timeout=400)[1] for worker in workers]
    for rank, (worker, log) in enumerate(zip(workers, logs, strict=True)):
        assert worker.returncode == 0, log[-4000:]
        assert f"process {rank} of 2" in log and "'fsdp': 4" in log
        read, stored = map(int, re.search(rf"process {rank} read (\d+) of the checkpoint's "
                                          r"(\d+) values", log).groups())
        assert stored / 2 <= read < stored * 0.6  # half the kernels, plus the norms
    single = run_main(*common[3:], f"--output_dir={tmp_path / 'one'}", cache=tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert "1 long-form edits" in two["title"] and not two["failed"]
    assert [a["answer"] for a in two["answers"]["post"]] == \
        [a["answer"] for a in one["answers"]["post"]]
    assert two["table"] == one["table"]
