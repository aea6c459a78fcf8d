"""The test suite; ``tests.support`` holds what its modules (and ``bench.chaos``) share."""
