"""The tiny pipeline on one node vs on the 2-node test cluster (S3 storage), wall time of each stage.

    python benchmarks/cluster_pipeline.py            # as root (the second node needs `unshare -m`)

One node: `python -m jobs.pipeline` with a local run dir on a local Ray cluster of 2 CPUs. Two nodes: the
cluster of tests/multinode.py (a head with 0 CPUs, a second node with 2 CPUs in its own mount namespace,
moto S3 on loopback), the same command submitted with `ray job submit`, `run_dir=s3://...` and the corpus
text on S3. Both runs use the same config (tiny, no CE-only / multilingual baselines), the same in-test
corpus and the same 2 CPUs for work, so the ratio is the cost of the cluster: storage round trips through
S3, artifacts fetched into each node's cache, the job's working dir shipped, tasks instead of in-process
work. Each stage's time is read from the pipeline's own `== stage: done in N s` lines.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import _stop_cluster, write_corpus  # noqa: E402
from tests.multinode import two_node_cluster  # noqa: E402

OVERRIDES = ["distill.baselines=false"]


def stage_seconds(logs: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"== (\w+): done in (\d+) s", logs)}


def one_node(corpus: Path, tmp: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--config", "configs/tiny.yaml",
                          f"run_dir={tmp / 'one'}", f"corpus.user_dir={corpus}", "ray.num_cpus=2", *OVERRIDES],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        sys.exit(f"one-node pipeline failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return stage_seconds(out.stdout + out.stderr), time.perf_counter() - t0


def two_nodes(corpus: Path, tmp: Path) -> tuple[dict, float]:
    import pyarrow.fs as pafs

    with two_node_cluster(tmp, _stop_cluster) as c:
        fs = pafs.S3FileSystem(endpoint_override=c.s3_endpoint, access_key="testing", secret_key="testing",
                               region="us-east-1", scheme="http")
        for path in corpus.rglob("*"):
            if path.is_file():
                with fs.open_output_stream(f"{c.bucket}/src/{path.relative_to(corpus).as_posix()}") as f:
                    f.write(path.read_bytes())
        t0 = time.perf_counter()
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", c.dashboard,
                              "--working-dir", str(ROOT), "--", "python", "-m", "jobs.pipeline", "--config",
                              "configs/tiny.yaml", f"run_dir=s3://{c.bucket}/runs/bench",
                              f"corpus.user_dir=s3://{c.bucket}/src", *OVERRIDES],
                             env=c.env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if out.returncode:
            sys.exit(f"two-node pipeline failed:\n{(out.stdout + out.stderr)[-3000:]}")
        return stage_seconds(out.stdout + out.stderr), wall


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="mome-bench-") as d:
        tmp = Path(d)
        corpus = write_corpus(tmp / "corpus")
        one, one_wall = one_node(corpus, tmp)
        two, two_wall = two_nodes(corpus, tmp / "cluster")
    print("\n| stage | one node (s) | 2-node cluster, S3 (s) | ratio |\n|---|---|---|---|")
    for stage in one:
        print(f"| {stage} | {one[stage]:.0f} | {two.get(stage, float('nan')):.0f} | {two.get(stage, 0) / one[stage]:.2f}x |")
    print(f"| **whole job** (incl. start-up, report) | {one_wall:.0f} | {two_wall:.0f} | {two_wall / one_wall:.2f}x |")


if __name__ == "__main__":
    main()
