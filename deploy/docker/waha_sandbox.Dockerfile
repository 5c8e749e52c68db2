# syntax=docker/dockerfile:1
# waha_sandbox, the stand-in of the WAHA HTTP API (compose profile `sandbox`). Build from the
# repository root (docker-compose.yml does):
#   docker build -f deploy/docker/waha_sandbox.Dockerfile -t whago/waha-sandbox:dev .
# Build stage: requirements.lock in a venv (no protobuf code: the sandbox speaks HTTP only);
# runtime stage: python slim with the venv and the program, a non-root user, an HTTP HEALTHCHECK.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
RUN pip install -r requirements.lock

FROM python:3.11.13-slim-bookworm AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin whago
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY waha_sandbox/ waha_sandbox/
COPY deploy/docker/healthcheck.py ./
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER whago
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "http", "http://127.0.0.1:3000/_sandbox/config"]
CMD ["python", "-m", "waha_sandbox", "--host", "0.0.0.0", "--port", "3000"]
