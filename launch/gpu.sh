#!/usr/bin/env bash
# GPUs: one process per host, driving all of that host's GPUs.
#
# One host (every local GPU joins the mesh; --mesh_fsdp=-1 takes the devices the other axes
# leave, so 8 GPUs are fsdp=8 unless --mesh_data/--mesh_tensor say otherwise):
#   launch/gpu.sh --flagfile=configs/muke.cfg
# Several hosts: run the same command on every node with its own NODE_RANK (0 is the
# coordinator; COORDINATOR is host:port of node 0, reachable from every node):
#   NUM_NODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:1234 launch/gpu.sh --flagfile=configs/muke.cfg
#   NUM_NODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:1234 launch/gpu.sh --flagfile=configs/muke.cfg
# (Under SLURM or Open MPI, `--distributed` alone is enough: JAX reads the rest from them.)
# Install: pip install -U "jax[cuda12]" && pip install -e .   (no torch needed)
# Restrict the GPUs with CUDA_VISIBLE_DEVICES; PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Default the mesh to "all GPUs along fsdp"; a --mesh_fsdp given later on the line wins.
args=(--mesh_fsdp=-1)
num_nodes="${NUM_NODES:-1}"
if (( num_nodes > 1 )); then
  : "${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1) for this node}"
  : "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
  args+=(--distributed "--coordinator_address=${COORDINATOR}" "--num_processes=${num_nodes}"
         "--process_id=${NODE_RANK}")
fi

exec "${PYTHON:-python}" -m keedit_jax.main "${args[@]}" "$@"
