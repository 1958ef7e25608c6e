# syntax=docker/dockerfile:1.7
# The HTTP gateway: SAX-HTTP (/generate) and OpenAI-compatible (/v1/chat/completions)
# endpoints, /health and /metrics, in front of a cell.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t sax-gateway:0.1.0 .
#   docker run -d --name sax-gateway --network host -e SAX_ROOT=gs://BUCKET/sax-root \
#       sax-gateway:0.1.0 --sax_cell=/sax/test --port=8888
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY deploy/docker/requirements/base.txt deploy/docker/requirements/gateway.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/gateway.txt

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY model_server ./model_server
COPY gateway ./gateway
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
EXPOSE 8888
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "sax.health_probe", "http://127.0.0.1:8888/health"]
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["--sax_cell=/sax/test", "--port=8888", "--host=0.0.0.0"]
