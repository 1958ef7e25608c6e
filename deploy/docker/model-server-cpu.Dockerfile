# syntax=docker/dockerfile:1.7
# A CPU model server (PyTorch engine, CPU wheels).
#
#   docker build -f deploy/docker/model-server-cpu.Dockerfile -t sax-model-server-cpu:0.1.0 .
#   docker run -d --name sax-model-server --network host -e SAX_ROOT=gs://BUCKET/sax-root \
#       sax-model-server-cpu:0.1.0 --sax_cell=/sax/test --port=10001 \
#       --platform_chip=cpu --platform_topology=1
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
# The engine's PyTorch, from the CPU wheel index (the default index's Linux wheels pull CUDA).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY deploy/docker/requirements/base.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/base.txt

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY model_server ./model_server
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 sax \
    && useradd --uid 10001 --gid sax --create-home --home-dir /home/sax --shell /usr/sbin/nologin sax \
    && install -d -o sax -g sax /var/lib/sax
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/sax
EXPOSE 10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "sax.health_probe", "127.0.0.1:10001"]
# SIGTERM drains: health NOT_SERVING, new calls refused, in-flight calls get --shutdown_grace_s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "model_server"]
CMD ["--sax_cell=/sax/test", "--port=10001", "--platform_chip=cpu", "--platform_topology=1"]
