# syntax=docker/dockerfile:1.7
# An NVIDIA GPU model server (PyTorch engine, CUDA wheels). Needs the NVIDIA container toolkit
# on the host (docker run --gpus=all) or the nvidia.com/gpu resource on Kubernetes.
#
#   docker build -f deploy/docker/model-server-cuda.Dockerfile -t sax-model-server-cuda:0.1.0 .
#   docker run -d --name sax-model-server --gpus=all --network host \
#       -e SAX_ROOT=gs://BUCKET/sax-root sax-model-server-cuda:0.1.0 --sax_cell=/sax/test \
#       --port=10001 --platform_chip=l4 --platform_topology=1
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# The CUDA base with Ubuntu's Python 3.12; the PyTorch wheels bring cuBLAS, cuDNN and NCCL.
FROM ${CUDA_IMAGE} AS python
# Ubuntu's python3.12 is not pinned to a patch release: the base image tag pins the release and
# the archive drops superseded security updates, which would break a pinned build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3.12 -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY deploy/docker/requirements/base.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/base.txt

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY model_server ./model_server
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --gid 10001 sax \
    && useradd --uid 10001 --gid sax --create-home --home-dir /home/sax --shell /usr/sbin/nologin sax \
    && install -d -o sax -g sax /var/lib/sax
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/sax
EXPOSE 10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "sax.health_probe", "127.0.0.1:10001"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "model_server"]
CMD ["--sax_cell=/sax/test", "--port=10001", "--platform_chip=h100", "--platform_topology=1"]
