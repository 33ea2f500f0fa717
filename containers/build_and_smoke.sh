#!/usr/bin/env bash
# Build the gptoss-nemo image FROM the NeMo container and check it: the CLI answers, Transformer Engine and the
# package import, and (with a GPU and the NVIDIA container runtime) the GPU tier passes inside the image.
#   containers/build_and_smoke.sh [NEMO_TAG] [IMAGE_NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-25.11}"
image="${2:-gptoss-nemo:nemo-${tag}}"
docker build -f containers/Dockerfile --build-arg "NEMO_TAG=${tag}" -t "${image}" .
docker run --rm "${image}" gptoss-nemo --version
docker run --rm "${image}" python -c "import transformer_engine, gptoss_nemo.model.build as b; print('TE', b.te_version())"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  docker run --rm --gpus all --ipc=host "${image}" python -m pytest -q -s tests/gpu
else
  echo "no GPU here: skipped the GPU tier inside the image"
fi
