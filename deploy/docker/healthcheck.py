"""Container health checks of the WHAGO images (Dockerfile HEALTHCHECK; exit 0 = healthy, 1 = not).

    python /app/healthcheck.py grpc CAMPAIGN_LISTEN 50051   # grpc.health.v1 Check("") on $CAMPAIGN_LISTEN's port
    python /app/healthcheck.py arq                          # worker: Redis answers, arq's health key is there
    python /app/healthcheck.py http http://127.0.0.1:3000/_sandbox/config   # 2xx

Standard library plus what the image already has (grpcio-health-checking, redis). Each check is
bounded by TIMEOUT seconds. `arq` is per deployment, not per container: arq workers of one queue
share one health key (`<DISPATCH_QUEUE>:health-check`, rewritten every 30 s by each), so it tells
that Redis is reachable from this container and that workers are running; a worker whose process
exits ends its container anyway."""

from __future__ import annotations

import os
import sys
import urllib.request

TIMEOUT = 3.0


def check_grpc(listen_env: str, default_port: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = os.environ.get(listen_env, f"0.0.0.0:{default_port}").rsplit(":", 1)[-1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def check_arq() -> bool:
    import redis

    r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                             socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
    try:
        key = os.environ.get("DISPATCH_QUEUE", "whago:dispatch") + ":health-check"
        return bool(r.ping()) and bool(r.exists(key))
    finally:
        r.close()


def check_http(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        return 200 <= int(resp.status) < 300


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["grpc"] and len(argv) == 3:
            ok = check_grpc(argv[1], argv[2])
        elif argv == ["arq"]:
            ok = check_arq()
        elif argv[:1] == ["http"] and len(argv) == 2:
            ok = check_http(argv[1])
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as e:  # unhealthy, with the reason in `docker inspect`
        print(f"unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not ok:
        print("unhealthy", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
