#!/usr/bin/env bash
# Two (or more) machines without a scheduler: run this on every node with the same HEAD address.
# torchrun's c10d rendezvous on HEAD:29400 forms the job; the run directory must be shared
# (NFS, or an s3:// checkpoint_storage).
set -euo pipefail
HEAD=${HEAD:?set HEAD to the address of the first node}
NNODES=${NNODES:-2}
batchproc run experiment.yaml \
  --set "entrypoint=python3 -m launch.torch_distributed --nnodes=$NNODES --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29400 --rdzv-id=batchproc-job -- python3 examples/classify_images.py" \
  "$@"
