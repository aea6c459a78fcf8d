"""The sharding arithmetic: every global batch exactly once, over any sequence of resumes."""

from hypothesis import given, settings, strategies as st

from batchproc.engine import sharding


def simulate(n: int, bs: int, attempts):
    """Run the round-robin over ``attempts`` = [(world_size, stop_step or None)], as the engine does."""
    total = sharding.num_batches(n, bs)
    G, seen = 0, []
    for W, stop in attempts:
        steps = sharding.steps_per_rank(G, total, W)
        ran = steps if stop is None else min(stop, steps)
        for r in range(W):
            batches = list(sharding.rank_batches(G, total, W, r))
            # the design's round-robin: g = G + k*W + r, every rank the same number of steps
            assert batches == [G + k * W + r for k in range(steps) if G + k * W + r < total]
            assert len(batches) in ((steps, steps - 1) if steps else (0,))  # at most one idle step
            for k in range(ran):
                g = sharding.global_batch(G, W, r, k)
                if g < total:
                    assert g == batches[k]
                    seen.append(g)
        G = sharding.watermark_after(G, total, W, ran)
        if G == total:
            break
    return total, G, seen


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 400), bs=st.integers(1, 17),
       attempts=st.lists(st.tuples(st.integers(1, 6), st.one_of(st.none(), st.integers(0, 12))), min_size=1, max_size=6))
def test_every_global_batch_exactly_once(n, bs, attempts):
    attempts = attempts + [(1, None)]  # the job is finally run to completion
    total, G, seen = simulate(n, bs, attempts)
    assert G == total
    assert sorted(seen) == list(range(total))
    samples = [i for g in seen for i in sharding.batch_indices(g, bs, n)]
    assert sorted(samples) == list(range(n))


def test_rank_with_no_batch_still_runs_every_step():
    assert sharding.num_batches(1, 4) == 1
    assert sharding.steps_per_rank(0, 1, 3) == 1
    assert list(sharding.rank_batches(0, 1, 3, 2)) == []


def test_max_batches_caps_per_worker():
    assert sharding.num_batches(100, 10, max_batches=2, world_size=3) == 6
    assert sharding.num_batches(100, 10, max_batches=5, world_size=3) == 10


def test_sampler_skips_done_work_without_touching_it():
    s = sharding.RankBatchSampler(dataset_len=10, batch_size=3, total=4, watermark=2, world_size=2, rank=1)
    assert list(s) == [[9]]
    assert len(s) == 1
