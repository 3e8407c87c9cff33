# A provider's worker image: the worker node and one engine. ENGINE=vllm (the default): vLLM
# (CUDA), run inside an Intel TDX confidential VM with the NVIDIA GPU in confidential-computing
# mode (see compose.yaml). ENGINE=cpu: llama.cpp with SmolLM2-135M-Instruct baked in (the
# compose "cpu" profile; what .ci/compose runs).
# The image's measurement is what the operator's allow-list (COCOON_ATTESTATION__POLICY_FILE)
# pins: build it reproducibly from a tagged release. Built without a network, from wheels made
# beforehand:
#   bash scripts/wheels.sh worker-vllm
#   DOCKER_BUILDKIT=0 docker build -f deploy/worker.Dockerfile \
#       --build-arg BASE_IMAGE="$(bash scripts/base-image.sh)" -t cocoon-worker .
#   (ENGINE=cpu: scripts/wheels.sh worker-cpu, --build-arg ENGINE=cpu -t cocoon-worker:cpu)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG ENGINE=vllm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /opt/cocoon
# Only the worker: the base install (requirements/worker.lock) and the engine, then workers/
# alone. No operator code (backend/, bot/, miniapp/) and none of its dependencies (aiogram,
# SQLAlchemy, tonutils, ...) are in this image: what runs next to the prompts is what a
# provider can audit.
COPY build/wheels/worker-${ENGINE} /tmp/wheels
RUN python3 -m venv /opt/venv \
    && pip install --find-links /tmp/wheels -r /tmp/wheels/requirements.txt \
        /tmp/wheels/setuptools-*.whl \
    && if [ -d /tmp/wheels/model ]; then pip install --no-deps /tmp/wheels/model/*.whl; fi \
    && rm -rf /tmp/wheels
COPY pyproject.toml README.md ./
COPY workers ./workers
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build workers pyproject.toml README.md *.egg-info

# The node takes TDX quotes through configfs-tsm (bind-mounted from the TD guest), which needs
# root inside the TD; it keeps its keys in memory only, so nothing of it needs to persist but
# the model weights (/models).
EXPOSE 9101
ENTRYPOINT ["cocoon-worker"]
CMD ["--help"]
