# syntax=docker/dockerfile:1.7
# The admin server of a cell; saxutil is in the image too.
#
#   docker build -f deploy/docker/admin-server.Dockerfile -t sax-admin-server:0.1.0 .
#   docker run --rm -e SAX_ROOT=gs://BUCKET/sax-root --entrypoint saxutil sax-admin-server:0.1.0 \
#       create /sax/test
#   docker run -d --name sax-admin-server --network host -e SAX_ROOT=gs://BUCKET/sax-root \
#       sax-admin-server:0.1.0 --sax_cell=/sax/test --port=10000
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# Dependencies only: rebuilt when a requirements file changes, not when the code does.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY deploy/docker/requirements/base.txt /tmp/requirements/
RUN pip install --no-cache-dir -r /tmp/requirements/base.txt

# The project as a wheel.
FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client ./client
COPY admin_server ./admin_server
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
EXPOSE 10000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "sax.health_probe", "127.0.0.1:10000"]
ENTRYPOINT ["python", "-m", "admin_server"]
CMD ["--sax_cell=/sax/test", "--port=10000", "--host=0.0.0.0"]
