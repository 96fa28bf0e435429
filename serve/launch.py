"""`mome serve RUN_DIR`: start Serve on this machine's Ray (or RAY_ADDRESS) and run the app until Ctrl-C.

    mome serve runs/small                                      # http://127.0.0.1:8000
    mome serve runs/small --port 8100 serve.teacher=false      # config overrides as in every mome command
    MOME_SERVE_TOKEN=secret mome serve runs/small --host 0.0.0.0   # other hosts: only with a token
    mome serve runs/small --deploy-config app.yaml && serve deploy app.yaml   # a cluster, hot-updatable
    mome serve runs/small --deploy-config app.yaml --host 0.0.0.0 serve.token_file=/etc/mome/token

`serve.model` picks the MoE variant (ple | jeet | moe-ce; default best: the grid's best routed top-1);
start-up says which it serves and why, and whether the router knows languages the MoE has no expert for.

`--deploy-config` writes a `serve deploy` config pinned to the run's current weights: the `moe` and
`teacher` deployments' user_configs hold their artifacts (the run's location + stages, fetched by each
replica on its own node) and the weights' sha256. RUN_DIR may be a URI (`mome serve s3://bucket/runs/small`).
Write and deploy it again after a re-distil: only the changed user_config differs, so Serve swaps that
model in place (`reconfigure`).

The bearer token never goes in a config: the ingress replicas read it in their own environment
(serve.token_file, else $MOME_SERVE_TOKEN or the env var serve.token_env names). Off loopback, both commands
refuse to start without one, and the app they deploy refuses to start where its replicas find none.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import time
from pathlib import Path

from mome_ray.cli import parse_args
from mome_ray.cluster import resolve_run_dir
from mome_ray.errors import MomeError

APP = "mome"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposed(serve_cfg, host: str) -> bool:
    """Whether `host` is off loopback; if so, refuse unless a token is found where this runs (the replicas read
    it from their own environment, which a local cluster shares and a real one must provide)."""
    if is_loopback(host):
        return False
    if not serve_cfg.token():
        raise MomeError(f"refusing to serve on {host} without a bearer token: export ${serve_cfg.token_env} "
                        f"(serve.token_env) or set serve.token_file=PATH, here and on the nodes that run the "
                        f"ingress (the token never goes in a config), or keep the default host 127.0.0.1")
    return True


def deploy_config(run_dir: str, config: str | None, overrides: list[str], host: str | None = None,
                  port: int | None = None, models: dict[str, str] | None = None) -> dict:
    """A `serve deploy` config (a dict; YAML on disk) for the run, each expert's user_config pinned."""
    from serve.app import AppArgs, resolve

    args = AppArgs(run_dir=resolve_run_dir(run_dir).location, config=str(Path(config).resolve()) if config else "",
                   overrides=list(overrides))
    serve_cfg, _, configs = resolve(args.model_copy(update={"models": models or {}}))
    host = host or serve_cfg.host
    args.require_token = check_exposed(serve_cfg, host)
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": host, "port": port or serve_cfg.port},
            "applications": [{"name": APP, "route_prefix": "/", "import_path": "serve.app:build_app",
                              "args": args.model_dump(exclude={"models"}),
                              "deployments": [{"name": n, "user_config": u} for n, u in configs.items()]}]}


def write_deploy_config(path: str, *args) -> None:
    import yaml

    Path(path).write_text("# serve deploy " + path + "   (written by mome serve --deploy-config)\n"
                          + yaml.safe_dump(deploy_config(*args), sort_keys=False))
    print(f"wrote {path}: serve deploy {path}")


def start(run_dir: str, config: str | None, overrides: list[str], host: str | None = None,
          port: int | None = None, log=print) -> str:
    """Deploy the app (Serve's HTTP proxy on host:port); returns its base URL."""
    from ray import serve

    from mome_ray.cluster import init_ray, signals_kept
    from mome_ray.serving import VARIANTS
    from mome_ray.settings import load_settings
    from serve.app import AppArgs, app_of, resolve, router_mismatch

    cfg = load_settings(config, overrides)
    host, port = host or cfg.serve.host, port or cfg.serve.port
    args = AppArgs(run_dir=resolve_run_dir(run_dir).location, config=config or "", overrides=overrides,
                   require_token=check_exposed(cfg.serve, host))
    resolved = resolve(args)
    spec = resolved[1]
    app = app_of(args, *resolved)
    with signals_kept(signal.SIGTERM):  # ray.init puts Ray's C++ handler there (a stack trace, then abort)
        init_ray(cfg.ray)
    serve.start(http_options={"host": host, "port": port})
    log(f"[serve] deploying {run_dir}/{cfg.serve.artifact}: {VARIANTS[spec.variant]} ({spec.why}), experts "
        f"{spec.members}{' + the teacher' if spec.teacher else ''}, on http://{host}:{port} ...")
    if warning := router_mismatch(spec):
        log(f"[serve] warning: {warning}")
    t0 = time.perf_counter()
    serve.run(app, name=APP, route_prefix="/")
    url = f"http://{host}:{port}"
    log(f"[serve] ready in {time.perf_counter() - t0:.0f} s: {url}/docs (OpenAPI), {url}/healthz")
    return url


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_forever(run_dir: str, config: str | None, overrides: list[str], host: str | None = None,
                  port: int | None = None) -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, systemd, Kubernetes: the same clean shutdown
    try:
        url = start(run_dir, config, overrides, host, port)
        print(f"try: curl -s {url}/v1/generate -d '{{\"prompt\": \"def fib(n):\", \"max_new_tokens\": 32}}'\n"
              f"Ctrl-C stops the app.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\n[serve] shutting down", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or SIGTERM must not break the shutdown
            signal.signal(sig, signal.SIG_IGN)
        stop()


def stop() -> None:
    """Remove the app; on a cluster of our own also Serve and the cluster's processes (on a shared one, via
    RAY_ADDRESS, other apps and Serve itself stay)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        serve.delete(APP)
    else:
        serve.shutdown()
    ray.shutdown()  # a local cluster's processes go with it, waited for
    print("[serve] stopped", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mome serve", description="serve the run's router + experts over HTTP with "
                                "Ray Serve (Ctrl-C or SIGTERM stops it)")
    p.add_argument("run_dir", help="the run directory (runs/small, /mnt/shared/runs/x or s3://bucket/runs/x), "
                   "after `mome moe`")
    p.add_argument("--config", "-c", help="a preset whose `serve:` section configures the app")
    p.add_argument("--host", help="bind address (default serve.host: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port: 8000)")
    p.add_argument("--deploy-config", metavar="FILE", help="write a `serve deploy` config pinned to the run's "
                   "current weights to FILE and exit (deploy it again after a re-distil: a hot update)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. serve.teacher=false")
    return p


def main(argv: list[str] | None = None) -> int:
    """`mome serve ...` (the library's CLI hands this command over to the app layer)."""
    args = parse_args(_parser(), sys.argv[1:] if argv is None else argv)  # options and overrides in any order
    try:
        if args.deploy_config:
            write_deploy_config(args.deploy_config, args.run_dir, args.config, args.overrides, args.host, args.port)
        else:
            serve_forever(args.run_dir, args.config, args.overrides, args.host, args.port)
    except MomeError as e:
        print(f"mome serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
