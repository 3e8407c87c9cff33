# A provider's worker image: the worker node with vLLM (CUDA), run inside an Intel TDX
# confidential VM with the NVIDIA GPU in confidential-computing mode (see compose.yaml).
# The image's measurement is what the operator's allow-list (COCOON_ATTESTATION__POLICY_FILE)
# pins: build it reproducibly from a tagged release.
#   docker build -f deploy/worker.Dockerfile -t cocoon-worker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cocoon
# Only the worker: the base install (requirements/worker.lock) and vLLM, then workers/ alone.
# No operator code (backend/, bot/, miniapp/) and none of its dependencies (aiogram, SQLAlchemy,
# tonutils, ...) are in this image: what runs next to the prompts is what a provider can audit.
COPY pyproject.toml README.md ./
COPY requirements/worker.lock ./requirements/worker.lock
RUN mkdir workers && touch workers/__init__.py \
    && pip install -c requirements/worker.lock ".[vllm]" \
    && pip uninstall -y cocoon
COPY workers ./workers
RUN pip install --no-deps -c requirements/worker.lock .

# The node takes TDX quotes through configfs-tsm (bind-mounted from the TD guest), which needs
# root inside the TD; it keeps its keys in memory only, so nothing of it needs to persist but
# the model weights (/models).
EXPOSE 9101
ENTRYPOINT ["cocoon-worker"]
CMD ["--help"]
