"""``python -m bench`` still runs end to end (tiny sizes: the figures themselves are not checked)."""

from __future__ import annotations

from tests.support import PY, ROOT


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
