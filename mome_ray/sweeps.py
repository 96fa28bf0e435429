"""What every Ray Tune sweep shares: search spaces as data, the Tuner, and the results table.

A search space is a YAML mapping (tune_spaces/*.yaml). Each leaf is a plain value (fixed) or one of

    {grid: [a, b, c]}        every value, crossed with the other grids
    {choice: [a, b, c]}      one at random per sample
    {uniform: [lo, hi]}      {loguniform: [lo, hi]}      {randint: [lo, hi]}

Nested mappings stay nested (the trainable gets the same shape back). Results come back as a pandas
DataFrame, written as CSV and as a markdown table beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

from mome_ray.config import load_yaml
from mome_ray.errors import MomeError

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


def _domain(spec: dict, where: str):
    from ray import tune

    (kind, values), = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise MomeError(f"search space '{where}': {kind} needs a non-empty list, got {values!r}")
        return tune.grid_search(values) if kind == "grid" else tune.choice(values)
    if not (isinstance(values, list) and len(values) == 2):
        raise MomeError(f"search space '{where}': {kind} needs [low, high], got {values!r}")
    lo, hi = values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](lo, hi)


def to_tune(space: dict, where: str = "") -> dict:
    """A YAML search space -> Ray Tune's param_space (same nesting)."""
    out = {}
    for key, value in space.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DOMAINS:
            out[key] = _domain(value, path)
        elif isinstance(value, dict):
            out[key] = to_tune(value, path)
        else:
            out[key] = value
    return out


def load_space(path: str | Path) -> dict:
    """Read tune_spaces/<name>.yaml; an unknown domain or a malformed one is an error naming the key."""
    path = Path(path)
    if not path.is_file():
        raise MomeError(f"no search space at '{path}'; see tune_spaces/README.md for the format")
    return load_yaml(str(path))


# What a trial that launches a TorchTrainer asks for itself (its Train workers hold the real CPUs). Count it
# in `max_concurrent`: two such trials of 1 CPU need 2.002 CPUs, and a trial admitted without room for its
# workers only holds its share and waits.
TRIAL_CPU = 0.001


def max_concurrent(need: dict[str, float], limit: int = 0, have: dict[str, float] | None = None) -> int:
    """How many trials needing `need` each ({"CPU": 4.001, "GPU": 0.5}) fit the cluster's totals `have`
    (default: the connected cluster's) at once, at least 1; capped by `limit` when it is set."""
    from mome_ray.launch import times_fit

    if have is None:
        import ray

        have = ray.cluster_resources()
    n = max(1, times_fit(need, have))
    return min(n, limit) if limit else n


def fit_sweep(tuner):
    """`tuner.fit()`, leaving this process's Ctrl-C handler as it was (`cluster.sigint_kept`)."""
    from mome_ray.cluster import sigint_kept

    with sigint_kept():
        return tuner.fit()


def restore_or_new(path: str, trainable, new, log=print):
    """The sweep stored at `path` restored when an interrupted run of it exists (finished trials kept,
    unfinished ones resumed), else `new()`, a fresh Tuner: re-running a sweep never starts over."""
    from ray import tune

    if tune.Tuner.can_restore(path):
        log(f"restoring the interrupted sweep {path}")
        return tune.Tuner.restore(path, trainable, resume_errored=True)
    return new()


def tracking_callbacks(mlflow_uri: str, experiment: str) -> list:
    """Tune logs CSV, JSON and TensorBoard event files by default; MLflow as well when given a URI."""
    if not mlflow_uri:
        return []
    try:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        import mlflow  # noqa: F401
    except ImportError as e:
        raise MomeError("an MLflow tracking URI was given but mlflow is not installed; "
                        "pip install mlflow (or drop sweep.mlflow_uri)") from e
    return [MLflowLoggerCallback(tracking_uri=mlflow_uri, experiment_name=experiment, save_artifact=False)]


def markdown_table(df, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table of a DataFrame (no extra dependency)."""

    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(df, out_dir: Path, name: str) -> tuple[Path, Path]:
    """`name`.csv and `name`.md in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    df.to_csv(csv, index=False)
    md.write_text(markdown_table(df))
    return csv, md
