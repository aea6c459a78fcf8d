"""One attempt on one rank: sharded loading, the processing loop, commits, preemption, verdicts."""
