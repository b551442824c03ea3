"""The launch grids' ceiling division equals the exact ⌈n / d⌉ (it replaces ``triton.cdiv`` on the host)."""

from fractions import Fraction
import math

import pytest

from resu.compile.grid import cdiv


@pytest.mark.parametrize("d", [1, 2, 7, 8, 1024, 4096])
def test_cdiv_is_the_exact_ceiling(d):
    for n in list(range(0, 3 * d + 2)) + [2**31 - 1, 2**31, 2**40 + 3]:
        assert cdiv(n, d) == math.ceil(Fraction(n, d))
