# syntax=docker/dockerfile:1.7
# A Cloud TPU model server (JAX for TPU: jax[tpu] with its pinned libtpu). On a TPU chip the
# server runs Llama configs with the JAX backend (--backend=jax, the default there; docs/jax.md),
# also over the hosts of a multi-host slice (--jax_coordinator, --jax_num_processes,
# --jax_process_id).
#
# It runs as root: the TPU devices (/dev/accel*, /dev/vfio) of TPU VMs and GKE TPU nodes belong
# to root, and the Saxml tutorial runs the server with --privileged.
#
#   docker build -f deploy/docker/model-server-tpu.Dockerfile -t sax-model-server-tpu:0.1.0 .
#   docker run -d --name sax-model-server --privileged --network host \
#       -e SAX_ROOT=gs://BUCKET/sax-root sax-model-server-tpu:0.1.0 --sax_cell=/sax/test \
#       --port=10001 --platform_chip=tpuv5e --platform_topology=2x2
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY deploy/docker/requirements/base.txt deploy/docker/requirements/tpu.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/tpu.txt

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY model_server ./model_server
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    JAX_PLATFORMS=tpu,cpu
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels \
    && mkdir -p /var/lib/sax
WORKDIR /var/lib/sax
EXPOSE 10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "sax.health_probe", "127.0.0.1:10001"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "model_server"]
CMD ["--sax_cell=/sax/test", "--port=10001", "--platform_chip=tpuv5e", "--platform_topology=2x2"]
