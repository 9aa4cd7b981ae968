#!/usr/bin/env bash
# One process on this machine, on every local device (CPU, one or several GPUs, a TPU VM).
#
#   launch/local.sh --flagfile=configs/muke.cfg
#   KEEDIT_HOST_DEVICES=4 launch/local.sh --flagfile=configs/muke.cfg --mesh_fsdp=2 --mesh_tensor=2
#
# Every argument goes to `python -m keedit_jax.main`. KEEDIT_HOST_DEVICES=N splits the CPU
# into N XLA devices, to try a mesh without an accelerator (the run is then sharded N ways
# on the same cores: a check of the layout, not a speed-up). PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${KEEDIT_HOST_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${KEEDIT_HOST_DEVICES}"
fi

exec "${PYTHON:-python}" -m keedit_jax.main "$@"
