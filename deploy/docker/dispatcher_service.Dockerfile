# syntax=docker/dockerfile:1
# dispatcher_service: the gRPC API (`python -m dispatcher_service.server`, the default command) and
# the arq workers (`python -m dispatcher_service.worker`, health check `healthcheck.py arq`, set in
# docker-compose.yml). Build from the repository root (docker-compose.yml does):
#   docker build -f deploy/docker/dispatcher_service.Dockerfile -t whago/dispatcher-service:dev .
# Build stage: requirements.lock in a venv, then the protobuf code generation (`make gen` without the
# mypy stubs); runtime stage: python slim with the venv, the generated `whago/` package and the
# program only, a non-root user and a grpc.health.v1 HEALTHCHECK.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY protos/ protos/
RUN python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. $(find protos -name '*.proto') \
    && find whago -type d -exec touch {}/__init__.py \;

FROM python:3.11.13-slim-bookworm AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin whago
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build /src/whago/ whago/
COPY dispatcher_service/ dispatcher_service/
COPY deploy/docker/healthcheck.py ./
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    DISPATCHER_LISTEN=0.0.0.0:50052
USER whago
EXPOSE 50052 50053
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/healthcheck.py", "grpc", "DISPATCHER_LISTEN", "50052"]
CMD ["python", "-m", "dispatcher_service.server"]
