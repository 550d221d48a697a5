"""TRAK, D-TRAK and K-FAC scores equal the ones pinned before the gradient engines were merged.

The reference (tests/methods/data/engine_reference.npz) was written by
tests/methods/data/make_engine_reference.py with the code before the merge.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.methods.data.make_engine_reference import CASES, REFERENCE, case_scores


@pytest.mark.parametrize("name", sorted(CASES))
def test_scores_equal_the_pinned_reference(name):
    expected = np.load(REFERENCE)[name]
    actual = case_scores(name)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)
