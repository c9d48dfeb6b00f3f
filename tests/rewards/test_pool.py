"""TimeoutPool: ordered results, failing items, dying workers, bad arguments."""

import os

import pytest

from msjax.rewards.pool import Outcome, TimeoutPool


def _work(x):
    """Squares x; raises on negatives; kills its own process on 13."""
    if x == 13:
        os._exit(3)
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def test_results_in_order_with_errors_and_deaths():
    with TimeoutPool(_work, num_workers=2, timeout_s=30.0) as pool:
        out = pool.map([(i,) for i in [3, -1, 13, 5, 0, 7]])
        assert out[0] == Outcome("ok", 9)
        assert out[1] == Outcome("error", "ValueError: negative -1")
        assert out[2] == Outcome("error", "worker died")
        assert [o.value for o in out[3:]] == [25, 0, 49]
        assert (pool.errors, pool.replaced, pool.timeouts) == (2, 1, 0)
        assert pool.map([]) == []
        assert pool.map([(4,)]) == [Outcome("ok", 16)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        TimeoutPool(_work, num_workers=0)
