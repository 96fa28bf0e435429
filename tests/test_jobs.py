"""Job submission: jobs.train_teacher submitted to a real `ray start` head through JobSubmissionClient."""

import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from mome_ray.artifacts import read_meta
from tests.conftest import copy_run

ROOT = Path(__file__).resolve().parents[1]


def test_submit_teacher_job_to_a_real_head(ray_head, tiny_tokenized, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = copy_run(tiny_tokenized.run_dir, tmp_path / "run")
    client = JobSubmissionClient(ray_head["dashboard"])
    job = client.submit_job(
        entrypoint=f"python -m jobs.train_teacher --config configs/tiny.yaml run_dir={run_dir} "
                   "teacher.train.max_steps=20",
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git", "runs", ".cache"]},
    )
    deadline = time.time() + 300
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in 300 s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "teacher ppl" in logs  # the per-language table was printed
    meta = read_meta(run_dir, "teacher")
    assert meta["metrics"]["final"]["step"] == 20
    AutoModelForCausalLM.from_pretrained(str(run_dir / "teacher"))
