from math import comb

import pytest

from codetune.eval.passk import ks_for, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n,c,k,expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0),
    (5, 2, 1, 0.4),  # c / n
    (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # C(7,5)=21, C(10,5)=252
    (4, 2, 3, 1.0),  # fewer failures than k: a pass is certain
    (20, 0, 10, 0.0),
])
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_combinatorial_formula_at_codex_scale():
    for c in (0, 1, 7, 50, 190, 200):
        for k in (1, 10, 100):
            exact = 1.0 if 200 - c < k else 1 - comb(200 - c, k) / comb(200, k)
            assert pass_at_k(200, c, k) == pytest.approx(exact, abs=1e-9)


def test_mean_and_ks():
    assert ks_for(1) == [1] and ks_for(20) == [1, 10] and ks_for(200) == [1, 10, 100]
    assert mean_pass_at_k([(5, 2), (5, 0)], [1, 2]) == pytest.approx({"pass@1": 0.2, "pass@2": 0.35})


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="n-samples"):
        pass_at_k(5, 1, 10)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
