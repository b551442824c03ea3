"""SelectionConfig: the seed fields and defaults, the strategies, validation and the selection counts."""

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resu.core.selective import SelectionConfig, selection_count


def test_seed_fields_and_defaults():
    cfg = SelectionConfig()
    assert (cfg.beta, cfg.delta, cfg.tau_stable, cfg.k_screen_ratio, cfg.k_select_ratio) == (0.9, 1e-8, 0.5, 0.5, 0.2)
    assert cfg.strategy == "consistency" and cfg.refresh_every is None and not cfg.is_static
    assert SelectionConfig(strategy="random", refresh_every=5).is_static
    assert [f.name for f in dataclasses.fields(SelectionConfig)][:5] == [
        "beta", "delta", "tau_stable", "k_screen_ratio", "k_select_ratio"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"), ({"beta": float("nan")}, "beta"),
        ({"delta": 0.0}, "delta"), ({"delta": -1e-8}, "delta"), ({"delta": float("inf")}, "delta"),
        ({"tau_stable": float("inf")}, "tau_stable"), ({"tau_stable": "0.5"}, "tau_stable"),
        ({"k_screen_ratio": 0.0}, "k_screen_ratio"), ({"k_screen_ratio": 1.5}, "k_screen_ratio"),
        ({"k_select_ratio": 0.0}, "k_select_ratio"), ({"k_select_ratio": True}, "k_select_ratio"),
        ({"strategy": "topk"}, "topk"),
        ({"strategy": "random", "refresh_every": 0}, "refresh_every"),
        ({"strategy": "random", "refresh_every": 2.5}, "refresh_every"),
        ({"refresh_every": 10}, "refresh_every"),  # consistency has no subset to refresh
    ],
)
def test_bad_fields_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SelectionConfig(**kwargs)


def test_dict_round_trip():
    cfg = SelectionConfig(beta=0.8, tau_stable=0.25, k_select_ratio=0.3, strategy="magnitude", refresh_every=7)
    assert SelectionConfig.from_dict(cfg.to_dict()) == cfg


@given(ratio=st.floats(min_value=1e-6, max_value=1.0), n=st.integers(min_value=0, max_value=10**7))
def test_counts_are_rounded_at_least_one_and_never_more_than_the_slots(ratio, n):
    k = selection_count(ratio, n)
    if n == 0:
        assert k == 0
        return
    assert 1 <= k <= n
    assert k == max(1, min(n, math.floor(ratio * n + 0.5)))
    assert abs(k - ratio * n) <= 0.5 or k == 1
    cfg = SelectionConfig(k_screen_ratio=ratio, k_select_ratio=ratio)
    assert cfg.screen_count(n) == cfg.select_count(n) == k
