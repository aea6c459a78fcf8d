"""The run's lifecycle: Determined's callback order, at-least-once on_finish, the state/exit-code
policy, the failure summary, and Determined's signatures.

Multi-process cases run through the real launcher (``batchproc run`` -> our launcher -> torchrun,
gloo on 127.0.0.1) with real signals.
"""

from __future__ import annotations

import inspect
import json
import errno
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from batchproc.rundir import lifecycle
from batchproc.rundir.lifecycle import ExitCode, IllegalTransition, RunState
from batchproc.rundir.storage import RunDir
from batchproc.control.supervisor import DIED_IN_FINISH, DIED_RUNNING, AttemptOutcome, ExitDecision, decide, resolve_exit_code, status_stamp
from tests.support import PY, ROOT, Procs, assert_exactly_once, base_env, shared_fs, sum_job_metrics, write_config

N, BS, INTERVAL = 23, 2, 3  # 12 batches: 6 per rank on 2 ranks, the last one partial


# -- the policy, as tables ---------------------------------------------------------------------

S = RunState
POLICY = [
    # child rc, state this attempt recorded, completed before, signal forwarded, interrupted -> verdict
    (0, S.COMPLETED, False, False, False, ExitDecision(ExitCode.COMPLETED)),
    (0, S.PREEMPTED, False, True, False, ExitDecision(ExitCode.PREEMPTED)),
    (1, S.PREEMPTED, False, True, False, ExitDecision(ExitCode.PREEMPTED)),  # torchrun's code after a signal
    (1, S.FAILED, False, False, False, ExitDecision(1)),  # a worker recorded its failure: nothing to add
    (1, S.FAILED, False, True, True, ExitDecision(ExitCode.PREEMPTED, S.PREEMPTED, "signal SIGINT before the workers could checkpoint")),
    (1, S.FAILED, False, True, False, ExitDecision(1)),  # a real failure while stopping stays a failure
    (-9 + 256, S.RUNNING, False, False, False, ExitDecision(247, S.FAILED, DIED_RUNNING)),  # a crash no worker could record
    (1, S.FINISHING, False, False, False, ExitDecision(1, S.FAILED, DIED_IN_FINISH, lifecycle.IN_ON_FINISH)),  # crash in on_finish
    (1, S.FINISHING, False, True, False, ExitDecision(ExitCode.PREEMPTED, S.PREEMPTED, "signal SIGTERM during on_finish, after every batch was committed")),
    (1, None, False, True, False, ExitDecision(ExitCode.PREEMPTED, S.PREEMPTED, "signal SIGTERM during start-up")),
    (1, None, False, False, False, ExitDecision(1, S.FAILED)),  # died before any worker wrote
    (1, None, True, False, False, ExitDecision(1)),  # a completed run's rerun failed early: stays completed
    (1, None, True, True, False, ExitDecision(ExitCode.COMPLETED)),  # ... or was stopped early: 0
    (0, S.RUNNING, False, False, False, ExitDecision(ExitCode.FAILED, S.FAILED, DIED_RUNNING)),  # exit 0, never finished
]


@pytest.mark.parametrize("child_rc,state,completed_before,signalled,interrupted,expected", POLICY)
def test_exit_code_policy(child_rc: int, state: Optional[RunState], completed_before: bool, signalled: bool,
                          interrupted: bool, expected: ExitDecision) -> None:
    name = "SIGINT" if interrupted else "SIGTERM"
    got = decide(AttemptOutcome(child_rc, state, completed_before, signalled, interrupted,
                                f"signal {name}" if signalled else ""))
    assert got == expected


VERDICT_POLICY = [  # child_rc, state, signalled, failed_for_good, failed_after_completion, expected
    (1, S.COMPLETED, False, True, True, ExitDecision(ExitCode.FAILED)),  # completed, then the script failed
    (1, S.COMPLETED, False, True, False, ExitDecision(ExitCode.COMPLETED)),  # a verdict of an earlier phase
    (1, S.PREEMPTED, False, True, False, ExitDecision(ExitCode.FAILED, S.FAILED)),  # a peer's SIGTERM after a verdict
    (1, S.PREEMPTED, True, True, False, ExitDecision(ExitCode.PREEMPTED)),  # the user's own stop stands
    (143, None, False, True, False, ExitDecision(ExitCode.FAILED, S.FAILED)),  # we stopped the ranks left waiting
    (0, None, False, True, False, ExitDecision(ExitCode.FAILED, S.FAILED)),  # every worker left cleanly
]


@pytest.mark.parametrize("child_rc,state,signalled,failed_for_good,after,expected", VERDICT_POLICY)
def test_exit_code_policy_after_a_verdict(child_rc: int, state: RunState, signalled: bool, failed_for_good: bool,
                                          after: bool, expected: ExitDecision) -> None:
    got = decide(AttemptOutcome(child_rc, state, state is S.COMPLETED, signalled, failed_for_good=failed_for_good,
                                failed_after_completion=after))
    assert got == expected


ALLOWED = [  # from, to, allowed
    (None, S.RUNNING, True), (S.RUNNING, S.FINISHING, True), (S.FINISHING, S.COMPLETED, True),
    (S.RUNNING, S.PREEMPTED, True), (S.PREEMPTED, S.RUNNING, True), (S.FAILED, S.FINISHING, True),
    (S.FINISHING, S.PREEMPTED, True), (S.FINISHING, S.FAILED, True),
    (S.FINISHING, S.RUNNING, False), (S.RUNNING, S.COMPLETED, False), (None, S.COMPLETED, False),
]


@pytest.mark.parametrize("before,after,allowed", ALLOWED)
def test_transitions(tmp_path: Path, before: Optional[RunState], after: RunState, allowed: bool) -> None:
    run_dir = RunDir(str(tmp_path))
    if before is not None:
        (tmp_path / lifecycle.STATUS_FILE).write_text(json.dumps({"state": before.value}))
    if allowed:
        assert lifecycle.transition(run_dir, after)
        assert lifecycle.read_state(run_dir) is after
    else:
        with pytest.raises(IllegalTransition):
            lifecycle.transition(run_dir, after)
        assert lifecycle.read_state(run_dir) is before


@pytest.mark.parametrize("after", [s for s in RunState if s is not S.COMPLETED])
def test_completed_stays_completed(tmp_path: Path, after: RunState) -> None:
    run_dir = RunDir(str(tmp_path))
    lifecycle.transition(run_dir, S.RUNNING, committed_batches=3)
    lifecycle.transition(run_dir, S.FINISHING)
    lifecycle.transition(run_dir, S.COMPLETED)
    assert not lifecycle.transition(run_dir, after, error="late")
    status = lifecycle.read_status(run_dir)
    assert status.state is S.COMPLETED and status.error is None and status.committed_batches == 3


def test_a_new_start_clears_the_previous_cause(tmp_path: Path) -> None:
    run_dir = RunDir(str(tmp_path))
    lifecycle.transition(run_dir, S.FAILED, error="ValueError: x", failed_rank=1, phase="in global batch 3")
    lifecycle.transition(run_dir, S.RUNNING)
    status = lifecycle.read_status(run_dir)
    assert (status.error, status.failed_rank, status.phase) == (None, None, None)


def test_root_cause_is_the_first_primary_error() -> None:
    f = lifecycle.Failure
    failures = [f("RuntimeError: [gloo] Connection closed by peer", 0, "in global batch 4", 10.0),
                f("UserCodeError: P.process_batch() raised ValueError: bad", 1, "in global batch 5", 11.0),
                f("UserCodeError: P.process_batch() raised ValueError: bad", 1, "in global batch 7", 12.0)]
    cause = lifecycle.root_cause(failures)
    assert cause is not None and (cause.rank, cause.phase) == (1, "in global batch 5")


def test_a_recorded_consequence_gives_way_to_the_crash_it_followed(tmp_path: Path) -> None:
    """Rank 1 SIGKILLed in on_finish; rank 0's allgather broke and rank 0 recorded that: the
    supervisor records the crash, where it happened and what rank 0 saw, not rank 0's error."""
    run_dir = RunDir(str(tmp_path))
    lifecycle.transition(run_dir, S.RUNNING, committed_batches=10, total_batches=10)
    lifecycle.transition(run_dir, S.FINISHING)
    before = status_stamp(run_dir)
    broken = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1234: Connection reset by peer")
    lifecycle.record_failure(run_dir, lifecycle.report_failure(run_dir, broken, 0, lifecycle.IN_ON_FINISH))
    assert resolve_exit_code(1, run_dir, before, since=0) == 1
    status = lifecycle.read_status(run_dir)
    assert status.state is S.FAILED and status.phase == "in on_finish" and status.phase_kind == "on-finish" and status.failed_rank is None, status
    assert (status.error or "").startswith(DIED_IN_FINISH + "; rank 0 then saw RuntimeError: [gloo"), status


# -- through the real launcher -------------------------------------------------------------------


def _config(tmp_path: Path, **kw: Any) -> Path:
    return write_config(tmp_path / "exp.yaml", [N, BS, INTERVAL], shared_fs(tmp_path / "runs"), name="fin",
                        script="tests/scripts/finish_job.py", **kw)


def _run(procs: Procs, config: Path, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> Any:
    return procs.run([PY, "-m", "batchproc", "run", str(config)], env, timeout=timeout)


def _log(tmp_path: Path, rank: int) -> List[str]:
    path = tmp_path / "log" / f"r{rank}.log"
    return path.read_text().splitlines() if path.exists() else []


def _finishes(tmp_path: Path, rank: int) -> List[Dict[str, Any]]:
    return [json.loads(line.split(" ", 1)[1]) for line in _log(tmp_path, rank) if line.startswith("finish ")]


def test_on_finish_sees_every_rank_published_and_final_metrics(tmp_path: Path, procs: Procs) -> None:
    done = _run(procs, _config(tmp_path), {"FINISH_JOB_LOG": str(tmp_path / "log")})
    assert done.rc == ExitCode.COMPLETED, done.out
    run_dir = tmp_path / "runs" / "fin"
    assert_exactly_once(run_dir, N)
    _assert_one_summary_per_rank(run_dir)
    for rank in (0, 1):
        log = _log(tmp_path, rank)
        # Determined's order: last batch -> final on_checkpoint_start -> (commit) -> on_finish
        assert log[-2] == "checkpoint" and log[-1].startswith("finish "), log
        (finish,) = _finishes(tmp_path, rank)
        assert finish == {"rows_published": N, "metrics": sum_job_metrics(N), "allgather": [0, 1],
                          "gather": [0, 10] if rank == 0 else None, "broadcast": "from 0"}


def _assert_one_summary_per_rank(run_dir: Path) -> None:
    summaries = [json.loads(p.read_text()) for p in (run_dir / "outputs").rglob("summary*.json")]
    assert sorted(s["rank"] for s in summaries) == [0, 1] and {s["rows"] for s in summaries} == {N}, summaries
    assert not [p for p in (run_dir / "staging").rglob("*") if p.is_file()], "staged files left behind"


def _assert_rerun_runs_only_on_finish(tmp_path: Path, procs: Procs, config: Path) -> None:
    before = {r: len([l for l in _log(tmp_path, r) if l.startswith("batch ")]) for r in (0, 1)}
    assert lifecycle.read_state(RunDir(str(tmp_path / "runs" / "fin"))) is not RunState.COMPLETED
    done = _run(procs, config, {"FINISH_JOB_LOG": str(tmp_path / "log")})
    assert done.rc == ExitCode.COMPLETED, done.out
    for rank in (0, 1):
        batches = len([l for l in _log(tmp_path, rank) if l.startswith("batch ")])
        assert batches == before[rank], "a start that finds 'finishing' must load no batch"
        last = _finishes(tmp_path, rank)[-1]
        assert (last["rows_published"], last["metrics"]) == (N, sum_job_metrics(N))
    assert_exactly_once(tmp_path / "runs" / "fin", N)
    _assert_one_summary_per_rank(tmp_path / "runs" / "fin")


def test_sigkill_during_on_finish_reruns_only_on_finish(tmp_path: Path, procs: Procs) -> None:
    config = _config(tmp_path)
    first = _run(procs, config, {"FINISH_JOB_LOG": str(tmp_path / "log"), "BATCHPROC_FAULT": "kill-in-finish@rank=1"})
    assert first.rc not in (ExitCode.COMPLETED, ExitCode.PREEMPTED), first.out
    status = lifecycle.read_status(RunDir(str(tmp_path / "runs" / "fin")))
    assert status.state is RunState.FAILED and status.all_committed, status
    assert status.phase == "in on_finish" and "a rerun runs only on_finish" in (status.error or ""), status
    last = first.out.strip().splitlines()[-2]
    assert "no worker recorded an error of its own" in last and "a rerun runs only on_finish" in last, last
    assert last.endswith("(in on_finish)"), last
    _assert_rerun_runs_only_on_finish(tmp_path, procs, config)


def test_preemption_during_on_finish_is_resumed_by_running_on_finish_again(tmp_path: Path, procs: Procs) -> None:
    config = _config(tmp_path)
    env = {"FINISH_JOB_LOG": str(tmp_path / "log"), "FINISH_JOB_SLEEP_IN_FINISH": "60"}
    t = procs.start([PY, "-m", "batchproc", "run", str(config)], env)
    t.wait_for(r"IN_FINISH", timeout=90)
    os.killpg(t.pid, signal.SIGTERM)  # as Kubernetes would: the whole group of `batchproc run`
    first = procs.finish(t, timeout=90)
    assert first.rc == ExitCode.PREEMPTED, first.out
    _assert_rerun_runs_only_on_finish(tmp_path, procs, config)


def test_failure_summary_leads_with_the_root_cause(tmp_path: Path, procs: Procs) -> None:
    config = _config(tmp_path, max_restarts=0)
    done = _run(procs, config, {"FINISH_JOB_RAISE_AT": "1:7"})
    assert done.rc not in (ExitCode.COMPLETED, ExitCode.PREEMPTED), done.out
    last = done.out.strip().splitlines()[-2:]
    assert "ValueError: bad record in batch 7" in last[0] and "rank 1" in last[0] and "in global batch 7" in last[0], last
    assert "6/12 batches committed; nothing committed was lost" in last[1] and "batchproc run" in last[1], last
    status = subprocess.run([PY, "-m", "batchproc", "status", str(tmp_path / "runs" / "fin")], env=base_env(),
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "state:     failed" in status.stdout
    assert "cause:     UserCodeError" in status.stdout and "bad record in batch 7 " in status.stdout
    assert "(rank 1, in global batch 7)" in status.stdout, status.stdout


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    run_dir = RunDir(str(tmp_path))
    lifecycle.transition(run_dir, S.RUNNING, metrics={f"m{i}": i for i in range(2000)})
    cmd = f"{PY} -m batchproc status {tmp_path} | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=base_env(),
                          cwd=ROOT, timeout=60)
    assert done.stdout.startswith("run:"), done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


# -- Determined's API, member by member ----------------------------------------------------------

# Written down from determined-ai/determined, harness/determined/pytorch/experimental/
# _torch_batch_process.py and pytorch/_reducer.py (parameter names, order, kinds and defaults).
DETERMINED = {
    "torch_batch_process": "(batch_processor_cls, dataset, batch_size=None, max_batches=None, checkpoint_interval=5, "
                           "dataloader_kwargs=None, distributed_context=None)",
    "to_device": "(self, data, warned_types=None)",
    "prepare_model_for_inference": "(self, model)",
    "upload_path": "(self)",
    "report_metrics": "(self, group, steps_completed, metrics)",
    "wrap_reducer": "(self, reducer, name=None, for_training=True, for_validation=True)",
    "report_task_using_model_version": "(self, model_version)",
    "report_task_using_checkpoint": "(self, checkpoint)",
    "get_distributed_rank": "(self)",
    "get_distributed_size": "(self)",
    "get_hparams": "(self)",
    "get_tensorboard_path": "(self)",
    "process_batch": "(self, batch, batch_idx)",
    "on_checkpoint_start": "(self)",
    "on_finish": "(self)",
    "reset": "(self)",
    "get_rank": "(self)",
    "get_size": "(self)",
    "get_local_rank": "(self)",
    "get_num_agents": "(self)",
    "gather": "(self, stuff)",
    "allgather": "(self, stuff)",
    "broadcast": "(self, stuff)",
    "gather_local": "(self, stuff)",
    "allgather_local": "(self, stuff)",
    "broadcast_local": "(self, stuff)",
    "per_slot_reduce": "(self)",
    "cross_slot_reduce": "(self, per_slot_metrics)",
}


def _shape(fn: Any) -> str:
    """The signature without annotations, and without our keyword-only additions."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()
              if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    return str(inspect.Signature(params))


def test_signatures_match_determined() -> None:
    from batchproc import (DistributedContext, MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext,
                           torch_batch_process)

    owners = {"torch_batch_process": torch_batch_process}
    for name in DETERMINED:
        if name == "torch_batch_process":
            continue
        owner = next(c for c in (TorchBatchProcessorContext, TorchBatchProcessor, MetricReducer, DistributedContext)
                     if hasattr(c, name))
        owners[name] = getattr(owner, name)
    got = {name: _shape(fn) for name, fn in owners.items()}
    assert got == DETERMINED
    # Our additions are keyword-only, after Determined's parameters.
    extra = [p for p in inspect.signature(torch_batch_process).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in extra] == ["storage", "storage_options", "bad_samples", "max_bad_samples",
                                      "bad_batches", "max_bad_batches", "batch_timeout_s", "schedule"]


def test_context_members_behave_as_determined(tmp_path: Path) -> None:
    """to_device, wrap_reducer with a function, report_task_using_*, positional arguments and
    batch_size from dataloader_kwargs, in one single-process run."""
    script = tmp_path / "job.py"
    script.write_text(_CONTEXT_JOB)
    done = subprocess.run([PY, str(script), str(tmp_path / "run")], env=base_env(), capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"completed": True, "steps": 3, "mean": 5.0, "devices": ["cpu", "cpu", "cpu"],
                      "moved_by_to": True, "numpy_tensor": True}
    sources = [json.loads(line) for line in (tmp_path / "run" / "model_sources.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in sources] == ["model_version", "checkpoint"]
    assert sources[0]["model_version"] == 3 and sources[1]["uuid"] == "ck-1"
    assert "there is no model registry" in done.stderr
    # Preempted, then resumed: the resumed attempt adds its lines after the first attempt's.
    for fault in ("stop@step=0", ""):
        env = dict(base_env(), BATCHPROC_FAULT=fault)
        step = subprocess.run([PY, str(script), str(tmp_path / "again")], env=env, capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert step.returncode == 0, step.stdout + step.stderr
    lines = [json.loads(line) for line in (tmp_path / "again" / "model_sources.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in lines] == ["model_version", "checkpoint"] * 2 and lines[0]["attempt"] != lines[2]["attempt"]


_CONTEXT_JOB = '''
import collections, json, sys, types
import numpy as np, torch
from batchproc import TorchBatchProcessor, torch_batch_process

SEEN = []

class Movable:
    def __init__(self): self.moved = None
    def to(self, device): self.moved = str(device); return self

class P(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        self.mean = context.wrap_reducer(lambda values: sum(values) / len(values), name="mean",
                                         for_training=True, for_validation=False)
        context.report_task_using_model_version(types.SimpleNamespace(model_id=7, model_version=3,
                                                checkpoint=types.SimpleNamespace(uuid="ck-0")))
        context.report_task_using_checkpoint(types.SimpleNamespace(uuid="ck-1"))
    def process_batch(self, batch, batch_idx):
        moved = self.context.to_device(collections.defaultdict(list, {"x": batch, "np": np.ones(2), "obj": Movable(),
                                                                      "s": "text", "np0": np.array(1.5)}))
        SEEN.append((str(moved["x"].device), moved["obj"].moved == "cpu",
                     isinstance(moved["np"], torch.Tensor) and isinstance(moved["np0"], torch.Tensor)))
        for v in batch.tolist():
            self.mean.update(v)

r = torch_batch_process(P, list(range(11)), None, None, 2, {"batch_size": 4}, None, storage=sys.argv[1])
print(json.dumps({"completed": r.completed, "steps": r.steps_completed, "mean": r.metrics["mean"],
                  "devices": [d for d, _, _ in SEEN], "moved_by_to": all(m for _, m, _ in SEEN),
                  "numpy_tensor": all(t for _, _, t in SEEN)}))
'''


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_storage_fails_at_the_first_attempt(code: int) -> None:
    """No restart replays a commit into a full or read-only run directory; wrapped errors too."""
    from batchproc.engine.verdict import is_deterministic

    error = OSError(code, os.strerror(code), "/runs/x/checkpoints/ckpt-00000003.json")
    assert is_deterministic(error)
    try:
        raise RuntimeError("rank 0 could not write checkpoint 3") from error
    except RuntimeError as wrapped:
        assert is_deterministic(wrapped)
    assert not is_deterministic(OSError(errno.ECONNRESET, "reset"))
