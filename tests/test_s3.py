"""A job whose run directory is on S3 (moto's server on 127.0.0.1, through s3fs): full and resumed."""

from __future__ import annotations

import json

import s3fs

from conftest import job_cmd


def s3_indices(url: str):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    rows = []
    for path in sorted(fs.find(url + "/outputs")):
        rows.extend(json.loads(l)["index"] for l in fs.cat_file(path).decode().splitlines())
    return sorted(rows), fs


def test_full_run_on_s3(procs, tmp_path, s3_server, s3_bucket):
    url = f"{s3_bucket}/runs/full"
    out = procs.run(job_cmd(2, 21, 2, 2, "-", url), env=s3_server["env"])
    assert out.rc == 0, out.out
    indices, fs = s3_indices(url)
    assert indices == list(range(21))
    ref = procs.run(job_cmd(0, 21, 2, 100, "-", tmp_path / "ref"))
    assert out.result()["metrics"] == ref.result()["metrics"]
    assert json.loads(fs.cat_file(url + "/metrics.json")) == ref.result()["metrics"]
    assert not fs.find(url + "/staging")


def test_preempted_then_resumed_on_s3(procs, tmp_path, s3_server, s3_bucket):
    url = f"{s3_bucket}/runs/resumed"
    env = dict(s3_server["env"], SUM_JOB_REPORT="1")  # report_metrics at each checkpoint
    first = procs.run(job_cmd(2, 21, 2, 2, "-", url), env=dict(env, BATCHPROC_FAULT="stop@step=2"))
    assert first.rc == 0 and first.result()["preempted"], first.out
    indices, fs = s3_indices(url)
    assert indices == list(range(12))
    reported = fs.cat_file(url + "/tensorboard/metrics.jsonl").decode().splitlines()
    second = procs.run(job_cmd(1, 21, 2, 2, "-", url), env=env)
    assert second.rc == 0 and second.result()["completed"], second.out
    assert s3_indices(url)[0] == list(range(21))
    # Reported metrics reach the run directory on S3, and the resumed attempt appends to them.
    fs.invalidate_cache()
    after = fs.cat_file(url + "/tensorboard/metrics.jsonl").decode().splitlines()
    assert reported and after[:len(reported)] == reported and len(after) > len(reported)
    ref = procs.run(job_cmd(0, 21, 2, 100, "-", tmp_path / "ref"))
    assert second.result()["metrics"] == ref.result()["metrics"]


def test_reported_metrics_reach_s3_at_each_checkpoint_even_if_the_job_then_dies(procs, s3_server, s3_bucket):
    url = f"{s3_bucket}/runs/killed"
    # 11 batches, a checkpoint every 2 steps: commits after steps 1 and 3, then SIGKILL at step 4.
    env = dict(s3_server["env"], SUM_JOB_REPORT="1", BATCHPROC_FAULT="kill@step=4")
    dead = procs.run(job_cmd(0, 21, 2, 2, "-", url), env=env)
    assert dead.rc != 0, dead.out
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    reported = [json.loads(l) for l in fs.cat_file(url + "/tensorboard/metrics.jsonl").decode().splitlines()]
    assert [r["group"] for r in reported] == ["checkpoint", "checkpoint"]
