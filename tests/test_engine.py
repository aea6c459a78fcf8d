"""The engine end to end: real torchrun, gloo on 127.0.0.1, real files.

Every test asserts what a user cares about: every dataset index's output exactly once in
outputs/, and metrics equal to a single-process run's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Union

import pytest
import torch

from batchproc import TorchBatchProcessor, torch_batch_process
from tests.support import Procs, assert_exactly_once, index_and_y, job_cmd, output_indices, output_rows, sum_job_metrics, sum_job_rows


def read_calls(calls_dir: Path) -> Dict[str, Any]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(calls_dir.glob("*.json"))}


@pytest.mark.parametrize("n,bs,max_batches,samples", [(13, 3, "-", 13), (50, 4, 6, 24)])
def test_single_process_run_is_what_the_closed_form_says(procs: Procs, tmp_path: Path, n: int, bs: int,
                                                         max_batches: Union[int, str], samples: int) -> None:
    """The other tests compare with ``sum_job_metrics``/``sum_job_rows`` instead of running this."""
    run_dir = tmp_path / "ref"
    out = procs.run(job_cmd(0, n, bs, 1000, max_batches, run_dir))
    assert out.rc == 0, out.out
    assert out.result()["metrics"] == sum_job_metrics(samples)
    assert json.loads((run_dir / "metrics.json").read_text()) == sum_job_metrics(samples)
    assert index_and_y(output_rows(run_dir)) == sum_job_rows(samples)


@pytest.mark.parametrize("world,n,bs,max_batches", [
    (1, 10, 3, "-"),      # single process under torchrun
    (2, 13, 3, "-"),      # not divisible: short last batch, uneven ranks
    (2, 50, 4, 3),        # max_batches caps each worker at 3 batches
    (3, 1, 4, "-"),       # one sample: two ranks have nothing and must not hang
    # (divisible runs on 2 and 3 ranks: tests/test_cli.py's preempt-twice case, test_preempt.py)
])
def test_exactly_once_and_exact_metrics(procs: Procs, tmp_path: Path, world: int, n: int, bs: int,
                                        max_batches: Union[int, str]) -> None:
    run_dir, calls = tmp_path / "run", tmp_path / "calls"
    out = procs.run(job_cmd(world, n, bs, 2, max_batches, run_dir), env={"SUM_JOB_CALLS_DIR": str(calls)})
    assert out.rc == 0, out.out
    result = out.result()
    assert result["completed"] and not result["preempted"]

    expected_n = n if max_batches == "-" else min(n, int(max_batches) * world * bs)
    assert index_and_y(output_rows(run_dir)) == sum_job_rows(expected_n)
    assert result["metrics"] == sum_job_metrics(expected_n)
    assert json.loads((run_dir / "metrics.json").read_text()) == result["metrics"]

    per_rank = read_calls(calls)
    assert sorted(per_rank) == [f"r{r}-0" for r in range(world)]
    assert all(c["calls"]["on_finish"] == 1 for c in per_rank.values())
    assert len({c["calls"]["on_checkpoint_start"] for c in per_rank.values()}) == 1
    assert sum(c["calls"]["process_batch"] for c in per_rank.values()) == -(-expected_n // bs)
    assert not (run_dir / "staging").exists() or not any((run_dir / "staging").rglob("*"))


# Stopped on `first` ranks, resumed on `second`: the same world size, then growing and shrinking
# (with signals instead of an injected stop: tests/test_cli.py's preempt-twice case, 2 -> 3 -> 1).
@pytest.mark.parametrize("first,second", [(2, 2), (1, 3), (3, 1)])
def test_stop_then_resume_with_any_world_size(procs: Procs, tmp_path: Path, first: int, second: int) -> None:
    """Whatever the world size before and after the stop, the resumed run ends with every sample's
    output exactly once and the metrics of one uninterrupted run."""
    n, bs, run_dir, calls = 29, 2, tmp_path / "run", tmp_path / "calls"
    env = {"SUM_JOB_CALLS_DIR": str(calls)}
    stopped = procs.run(job_cmd(first, n, bs, 3, "-", run_dir), env=dict(env, BATCHPROC_FAULT="stop@step=3"))
    assert stopped.rc == 0, stopped.out
    r1 = stopped.result()
    assert r1["preempted"] and not r1["completed"]
    assert r1["steps_completed"] == 4 * first * 1  # 4 steps of `first` ranks, one batch each
    assert output_indices(run_dir) == list(range(4 * first * bs))  # committed work is published

    resumed = procs.run(job_cmd(second, n, bs, 3, "-", run_dir), env=env)
    assert resumed.rc == 0, resumed.out
    r2 = resumed.result()
    assert r2["completed"]
    assert r2["metrics"] == sum_job_metrics(n)
    assert_exactly_once(run_dir, n)  # rows, metrics.json, nothing staged, status completed

    per_rank = read_calls(calls)
    finishes = {k: c["calls"]["on_finish"] for k, c in per_rank.items()}
    assert finishes == {**{f"r{r}-0": 0 for r in range(first)},
                        **{f"r{r}-{1 if r < first else 0}": 1 for r in range(second)}}


def test_completed_run_started_again_writes_nothing(procs: Procs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert procs.run(job_cmd(0, 9, 2, 2, "-", run_dir)).rc == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    again = procs.run(job_cmd(0, 9, 2, 2, "-", run_dir))
    assert again.rc == 0, again.out
    assert again.result()["completed"]
    assert again.result()["metrics"] == sum_job_metrics(9)
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name not in (".lock", ".lock.holder")}
    assert after == {p: t for p, t in before.items() if p.name not in (".lock", ".lock.holder")}


def test_changed_dataset_is_a_clear_error(procs: Procs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert procs.run(job_cmd(0, 9, 2, 1, "-", run_dir), env={"BATCHPROC_FAULT": "stop@step=1"}).rc == 0
    out = procs.run(job_cmd(0, 11, 2, 1, "-", run_dir))
    assert out.rc != 0
    assert "FingerprintMismatchError" in out.out and "dataset_len=9" in out.out and "--fresh" in out.out
    assert output_indices(run_dir) == list(range(4))  # nothing committed was lost


class _Noop(TorchBatchProcessor):
    def process_batch(self, batch: Any, batch_idx: int) -> None:
        pass


@pytest.mark.parametrize("kwargs,word", [
    ({"shuffle": True}, "shuffle"),
    ({"sampler": [0, 1]}, "sampler"),
    ({"batch_sampler": [[0]]}, "batch_sampler"),
    ({"batch_size": 4}, "batch_size"),
])
def test_invalid_dataloader_kwargs_rejected(tmp_path: Path, kwargs: Dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        torch_batch_process(_Noop, list(range(10)), batch_size=2, dataloader_kwargs=kwargs, storage=str(tmp_path))


class _Broken(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 4:
            raise OSError("disk says no")
        return torch.tensor(i)


def test_bad_sample_names_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(Exception, match=r"sample 4 .*disk says no"):
        torch_batch_process(_Noop, _Broken(), batch_size=2, checkpoint_interval=1, storage=str(tmp_path / "run"))
    # The batches before the bad one were committed.
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and status["committed_batches"] == 2


_ORPHAN = """
import os, sys, time, torch
from torch.utils.data import DataLoader
from batchproc.engine.loader import _WorkerInit

class Items(torch.utils.data.Dataset):
    def __len__(self): return 10
    def __getitem__(self, i): return i

def pause(worker_id):
    time.sleep(1)

if __name__ == "__main__":  # spawn and forkserver import this file again in the worker
    pid = os.fork()
    if pid == 0:  # the rank: it dies while its loader worker is still starting
        it = iter(DataLoader(Items(), batch_size=2, num_workers=1, worker_init_fn=_WorkerInit(pause),
                             multiprocessing_context=sys.argv[1]))
        print(it._workers[0].pid, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_loader_worker_does_not_outlive_a_rank_that_died_while_it_started(procs: Procs, tmp_path: Path,
                                                                            start_method: str) -> None:
    """torch's workers watch for their parent's death by its pid, seen once they start: a rank
    SIGKILLed (or signalled at start-up) before then left its worker behind, reparented to init,
    forever. Ours ask the kernel to kill them with their rank, under every start method (under
    forkserver the worker's parent is the rank's fork server, which exits with the rank)."""
    import os
    import time

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN)
    done = procs.run([sys.executable, str(script), start_method], timeout=60)
    worker = int(done.out.split()[0])
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        with open(f"/proc/{worker}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.2)
    else:
        alive = os.path.exists(f"/proc/{worker}")
        if alive:
            os.kill(worker, 9)
        assert not alive, f"loader worker {worker} outlived its rank"
