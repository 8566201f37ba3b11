"""The launchers' integer helpers equal triton.cdiv / triton.next_power_of_2 (which they replace on the host)."""

import pytest

from apt_kernels._intmath import cdiv, next_power_of_2


def test_against_closed_forms():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 4095, 4096, 4097)] == \
        [0, 1, 2, 4, 4, 8, 16, 32, 4096, 4096, 8192]
    assert [cdiv(n, 16) for n in (0, 1, 15, 16, 17, 33)] == [0, 1, 1, 1, 2, 3]
    assert cdiv(2 ** 40 + 1, 2 ** 20) == 2 ** 20 + 1


def test_equal_to_triton():
    triton = pytest.importorskip("triton")
    for n in list(range(0, 2050)) + [2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
