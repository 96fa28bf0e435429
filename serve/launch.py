"""`mome serve RUN_DIR`: start Serve on this machine's Ray (or RAY_ADDRESS) and run the app until Ctrl-C.

    mome serve runs/small                                      # http://127.0.0.1:8000
    mome serve runs/small --port 8100 serve.teacher=false      # config overrides as in every mome command
    MOME_SERVE_TOKEN=secret mome serve runs/small --host 0.0.0.0   # other hosts: only with a token
"""

from __future__ import annotations

import ipaddress
import time

from mome_ray.errors import MomeError

APP = "mome"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def start(run_dir: str, config: str | None, overrides: list[str], host: str | None = None,
          port: int | None = None, log=print) -> str:
    """Deploy the app (Serve's HTTP proxy on host:port); returns its base URL."""
    from ray import serve

    from mome_ray.cluster import init_ray
    from mome_ray.settings import load_settings
    from serve.app import AppArgs, build_app

    cfg = load_settings(config, overrides)
    host, port = host or cfg.serve.host, port or cfg.serve.port
    if not is_loopback(host) and not cfg.serve.token():
        raise MomeError(f"refusing to serve on {host} without a token: set $MOME_SERVE_TOKEN or "
                        f"serve.auth_token, or keep the default host 127.0.0.1")
    app = build_app(AppArgs(run_dir=run_dir, config=config or "", overrides=overrides))
    init_ray(cfg.ray)
    serve.start(http_options={"host": host, "port": port})
    log(f"[serve] deploying {run_dir} (router + {cfg.serve.artifact} experts) on http://{host}:{port} ...")
    t0 = time.perf_counter()
    serve.run(app, name=APP, route_prefix="/")
    url = f"http://{host}:{port}"
    log(f"[serve] ready in {time.perf_counter() - t0:.0f} s: {url}/docs (OpenAPI), {url}/healthz")
    return url


def serve_forever(run_dir: str, config: str | None, overrides: list[str], host: str | None = None,
                  port: int | None = None) -> None:
    from ray import serve

    url = start(run_dir, config, overrides, host, port)
    print(f"try: curl -s {url}/v1/generate -d '{{\"prompt\": \"def fib(n):\", \"max_new_tokens\": 32}}'\n"
          f"Ctrl-C stops the app.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[serve] shutting down")
    finally:
        serve.shutdown()
