#!/usr/bin/env bash
# Serve a dyngate model repository with NVIDIA's Triton Inference Server container on a GPU host.
#
# The embedded server (`dyngate serve`) runs only python-backend models. The container also has the
# onnxruntime, pytorch and tensorrt backends, so it serves the native-flavour variants
# (`<model>__<variant>__native`, platform onnxruntime_onnx / pytorch_libtorch) as well, from the same folder.
#
# The python-backend variants import onnxruntime, tokenizers and Pillow (torch for TorchScript variants) in
# their model.py; the container's Python has none of them. By default this script pip-installs them when the
# container starts (needs internet in the container, ~1 min). For repeated use build a derived image once:
#
#     FROM nvcr.io/nvidia/tritonserver:24.10-py3
#     RUN pip install --no-cache-dir onnxruntime-gpu tokenizers pillow "numpy<2"
#
# and run with TRITON_IMAGE=<your image> TRITON_PIP_PACKAGES="" .
# (Triton 24.10 = server 2.51, the version the nvidia-pytriton wheel embeds; its Python is 3.10.)
#
# Usage: scripts/triton_container.sh [REPOSITORY] [extra tritonserver flags...]
#   REPOSITORY            model repository folder (default: ./model_repository)
#   TRITON_IMAGE          container image (default: nvcr.io/nvidia/tritonserver:24.10-py3)
#   HTTP_PORT GRPC_PORT METRICS_PORT   host ports (default 8000 8001 8002)
#   TRITON_GPUS           value of docker --gpus (default: all; "" runs on CPU)
#   TRITON_PIP_PACKAGES   packages installed at start (default: onnxruntime-gpu tokenizers pillow "numpy<2")
#   TRITON_MODELS         space-separated models to load (default: all models in the repository)
#   DOCKER                container CLI (default: docker; podman works too)
#   DRY_RUN=1             print the command instead of running it
set -euo pipefail

REPOSITORY="${1:-model_repository}"
if [[ $# -gt 0 ]]; then shift; fi
TRITON_IMAGE="${TRITON_IMAGE:-nvcr.io/nvidia/tritonserver:24.10-py3}"
HTTP_PORT="${HTTP_PORT:-8000}"
GRPC_PORT="${GRPC_PORT:-8001}"
METRICS_PORT="${METRICS_PORT:-8002}"
TRITON_GPUS="${TRITON_GPUS-all}"
TRITON_PIP_PACKAGES="${TRITON_PIP_PACKAGES-onnxruntime-gpu tokenizers pillow numpy<2}"
TRITON_MODELS="${TRITON_MODELS:-}"
DOCKER="${DOCKER:-docker}"

if [[ ! -d "$REPOSITORY" ]]; then
  echo "error: model repository '$REPOSITORY' is not a directory; run 'dyngate build' first or pass the folder" >&2
  exit 2
fi
REPOSITORY="$(cd "$REPOSITORY" && pwd)"
if [[ -z "${DRY_RUN:-}" ]] && ! command -v "$DOCKER" >/dev/null 2>&1; then
  echo "error: '$DOCKER' not found; this script needs a container engine (and the NVIDIA container toolkit" \
       "for GPUs). Without one, use the embedded server: dyngate serve" >&2
  exit 2
fi

server_args=(tritonserver --model-repository=/models --strict-readiness=false --exit-on-error=false)
if [[ -n "$TRITON_MODELS" ]]; then
  server_args+=(--model-control-mode=explicit)
  for model in $TRITON_MODELS; do server_args+=("--load-model=$model"); done
fi
server_args+=("$@")

# One shell command inside the container: install the python packages (if any), then exec tritonserver.
inner=""
if [[ -n "$TRITON_PIP_PACKAGES" ]]; then
  read -r -a pip_packages <<< "$TRITON_PIP_PACKAGES"
  inner="pip install --no-cache-dir --quiet $(printf '%q ' "${pip_packages[@]}")&& "
fi
inner+="exec $(printf '%q ' "${server_args[@]}")"

docker_args=(run --rm --init --name "dyngate-triton-$HTTP_PORT"
  --shm-size=1g --ulimit memlock=-1 --ulimit stack=67108864
  -p "$HTTP_PORT:8000" -p "$GRPC_PORT:8001" -p "$METRICS_PORT:8002"
  -v "$REPOSITORY:/models:ro")
if [[ -n "$TRITON_GPUS" ]]; then docker_args+=(--gpus "$TRITON_GPUS"); fi
docker_args+=("$TRITON_IMAGE" bash -c "$inner")

echo "Triton container on http://127.0.0.1:$HTTP_PORT  grpc 127.0.0.1:$GRPC_PORT  metrics http://127.0.0.1:$METRICS_PORT/metrics" >&2
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "$DOCKER" "${docker_args[@]}"; echo
  exit 0
fi
exec "$DOCKER" "${docker_args[@]}"
