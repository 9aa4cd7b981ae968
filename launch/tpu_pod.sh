#!/usr/bin/env bash
# TPU VM pod slice (e.g. v4-32, v5e-64): the same command on every worker, one process each.
# On TPU pods jax.distributed finds the coordinator, the process count and each worker's id
# by itself, so `--distributed` is the only multi-host flag; the mesh spans all workers'
# chips (--mesh_fsdp=-1 by default). Process 0 writes the results, on worker 0.
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh --flagfile=configs/muke.cfg
#
# Once per pod, install the library on every worker (a checkout in ~/keedit_jax; no torch):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command='
#     git clone <REPO_URL> keedit_jax && pip install -U "jax[tpu]" && pip install -e keedit_jax'
# The checkpoint (--model, a path) and the cache (KEEDIT_CACHE, where the organism and the
# statistics live) must exist at the same path on every worker, e.g. a shared disk or bucket
# mount; each worker reads only its own chips' slices of the checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-keedit_jax}"  # the checkout's directory on the workers, relative to home

# Quote every argument so that it reaches the workers' shell unchanged.
ARGS="$(printf ' %q' "$@")"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ${REPO} && python -m keedit_jax.main --distributed${ARGS}"
