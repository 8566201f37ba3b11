"""The error-budget helper must fail when it should."""

import pytest
import torch

from apt_kernels.testing import assert_parity, error_budget, poison_


def test_budget_accepts_error_like_the_references_and_rejects_larger():
    truth = torch.randn(100, dtype=torch.float64)
    lowp = truth.to(torch.bfloat16)
    assert_parity(lowp, lowp, truth)  # the reference's own error passes
    budget = error_budget(lowp, truth, torch.bfloat16)
    bad = truth.clone()
    bad[3] += 3 * budget
    with pytest.raises(AssertionError, match="max error"):
        assert_parity(bad.to(torch.bfloat16), lowp, truth)


def test_nan_and_inf_handling():
    truth = torch.tensor([1.0, float("-inf"), 2.0], dtype=torch.float64)
    same = truth.float()
    assert_parity(same, same, truth)
    nan = same.clone()
    nan[0] = float("nan")
    with pytest.raises(AssertionError, match="NaN/inf"):
        assert_parity(nan, same, truth)
    with pytest.raises(AssertionError, match="NaN/inf"):
        assert_parity(torch.tensor([1.0, 0.0, 2.0]), same, truth)
    with pytest.raises(AssertionError, match="shape"):
        assert_parity(same[:2], same, truth)


def test_poison():
    assert torch.isnan(poison_(torch.empty(3))).all()
    assert (poison_(torch.empty(3, dtype=torch.int32)) == -1).all()
