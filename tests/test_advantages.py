import pytest
import torch

from mr1fast import group_advantages


def test_group_scale_matches_definition():
    r = torch.tensor([1.0, 0.0, 2.0, 1.0, 5.0, 5.0, 4.0, 6.0])
    a = group_advantages(r, 4)
    for g in range(2):
        grp = r[4 * g: 4 * g + 4].double()
        want = (grp - grp.mean()) / (grp.std(unbiased=True) + 1e-4)
        assert torch.allclose(a[4 * g: 4 * g + 4].double(), want, atol=1e-6)


def test_equal_rewards_give_zeros_not_nan():
    a = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert torch.equal(a, torch.zeros(6)) and not torch.isnan(a).any()


def test_batch_and_none_scales():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    centred = torch.tensor([0.5, -0.5, 1.0, -1.0])
    assert torch.allclose(group_advantages(r, 2, scale="none"), centred)
    assert torch.allclose(group_advantages(r, 2, scale="batch"), centred / (r.std() + 1e-4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.ones(6), group_size=4), "group_size"),
    (dict(rewards=torch.ones(6), group_size=1), "group_size"),
    (dict(rewards=torch.ones(2, 3), group_size=3), "rewards"),
    (dict(rewards=torch.ones(6, dtype=torch.long), group_size=3), "rewards"),
    (dict(rewards=torch.ones(6), group_size=3, scale="global"), "scale"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)
