"""``python -m bench`` still runs end to end (tiny sizes: the figures themselves are not checked)."""

from __future__ import annotations

from tests.support import PY, ROOT, base_env


def test_bench_writes_its_table_and_keeps_the_text_around_it(procs, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n\n<!-- bench: generated, from here -->\nold\n<!-- bench: to here -->\n\nhistory\n")
    done = procs.run([PY, "-m", "bench", "--runs", "1", "--images", "8", "--rows", "aho", "--out", str(out)],
                     cwd=ROOT, timeout=300)
    assert done.rc == 0, done.out
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.rstrip().endswith("history") and "\nold\n" not in text
    # Row g (the shipped example's path) runs the same measuring code as row a, on another workload.
    for row in ("| a | throughput, 1 process", "| e | peak RSS", "| o | same work, 1 process", "| o | batchproc run, 2 slots"):
        assert row in text, text
    assert "Row h" in text


def test_bench_schedule_rows_run(procs, tmp_path):
    """Row y (schedules) end to end at tiny sizes: the sleep, text, commit (S3) and resume parts."""
    out = tmp_path / "BENCHMARKS.md"
    env = base_env({"BENCH_SCHEDULE_SMALL": "1", "BENCH_SCHEDULE_PARTS": "sleeps,text,commit,resume"})
    done = procs.run([PY, "-m", "bench", "--runs", "1", "--images", "8", "--rows", "y", "--out", str(out)],
                     cwd=ROOT, env=env, timeout=300)
    assert done.rc == 0, done.out
    text = out.read_text()
    for row in ("| y | uneven:", "| y | uneven real work:", "| y | commit after every batch, 2 ranks, S3",
                "| y | resume: time to first batch"):
        assert row in text, text
