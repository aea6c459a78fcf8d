"""A job whose run directory is on S3 (moto's server on 127.0.0.1, through s3fs): preempted, resumed, killed."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

import s3fs

from tests.support import Procs, job_cmd, sum_job_metrics, sum_job_rows

N, BS = 21, 2


def s3_rows(url: str) -> Tuple[List[Tuple[int, float]], Any]:
    """The (index, y) rows under ``url``/outputs, sorted, and the filesystem that read them."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    rows = []
    for path in sorted(fs.find(url + "/outputs")):
        rows.extend(json.loads(line) for line in fs.cat_file(path).decode().splitlines())
    return sorted((r["index"], r["y"]) for r in rows), fs


def test_preempted_then_resumed_on_s3(procs: Procs, s3_server: Dict[str, Any], s3_bucket: str) -> None:
    url = f"{s3_bucket}/runs/resumed"
    env = dict(s3_server["env"], SUM_JOB_REPORT="1")  # report_metrics at each checkpoint
    first = procs.run(job_cmd(2, N, BS, 2, "-", url), env=dict(env, BATCHPROC_FAULT="stop@step=2"))
    assert first.rc == 0 and first.result()["preempted"], first.out
    rows, fs = s3_rows(url)
    assert rows == sum_job_rows(12)  # 3 steps of 2 ranks, 2 samples a batch
    reported = fs.cat_file(url + "/tensorboard/metrics.jsonl").decode().splitlines()
    second = procs.run(job_cmd(1, N, BS, 2, "-", url), env=env)
    assert second.rc == 0 and second.result()["completed"], second.out
    assert s3_rows(url)[0] == sum_job_rows(N)
    # Reported metrics reach the run directory on S3, and the resumed attempt appends to them.
    fs.invalidate_cache()
    after = fs.cat_file(url + "/tensorboard/metrics.jsonl").decode().splitlines()
    assert reported and after[:len(reported)] == reported and len(after) > len(reported)
    assert second.result()["metrics"] == sum_job_metrics(N)
    assert json.loads(fs.cat_file(url + "/metrics.json")) == sum_job_metrics(N)
    assert not fs.find(url + "/staging")


def test_reported_metrics_reach_s3_at_each_checkpoint_even_if_the_job_then_dies(
        procs: Procs, s3_server: Dict[str, Any], s3_bucket: str) -> None:
    url = f"{s3_bucket}/runs/killed"
    # 11 batches, a checkpoint every 2 steps: commits after steps 1 and 3, then SIGKILL at step 4.
    env = dict(s3_server["env"], SUM_JOB_REPORT="1", BATCHPROC_FAULT="kill@step=4")
    dead = procs.run(job_cmd(0, N, BS, 2, "-", url), env=env)
    assert dead.rc != 0, dead.out
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    reported = [json.loads(line) for line in fs.cat_file(url + "/tensorboard/metrics.jsonl").decode().splitlines()]
    assert [r["group"] for r in reported] == ["checkpoint", "checkpoint"]
    assert [r["steps_completed"] for r in reported] == [1, 3]
