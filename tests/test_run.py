"""Trainer plumbing: bf16 master weights, the LR schedule, the data order."""
import pytest
import torch

from mr1fast.trainer.data import DataOrder
from mr1fast.trainer.run import MasterWeightsAdamW, lr_at, make_optimizer


def test_bf16_weights_train_through_fp32_masters(tmp_path):
    """lr=1e-6 on bf16 weights: plain AdamW loses every update, the masters keep them."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 8).bfloat16()
    mixed = torch.nn.Linear(8, 8).bfloat16()
    mixed.load_state_dict(plain.state_dict())
    start = mixed.weight.detach().clone()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-6, weight_decay=0.0)
    opt_mixed = make_optimizer(mixed, lr=1e-6, weight_decay=0.0)
    assert isinstance(opt_mixed, MasterWeightsAdamW)
    x = torch.randn(4, 8).bfloat16()
    for _ in range(200):
        for model, opt in ((plain, opt_plain), (mixed, opt_mixed)):
            opt.zero_grad()
            model(x).float().sum().backward()
            opt.step()
    assert torch.equal(plain.weight, start)  # every update rounded away
    assert not torch.equal(mixed.weight, start)
    moved = (opt_mixed.master[0] - start.float()).abs().mean()
    assert moved == pytest.approx(200 * 1e-6, rel=0.2)  # Adam moves ~lr per step

    # A checkpoint stores the fp32 masters and AdamW's state; loading restores both and rounds
    # the masters into the bf16 weights.
    import torch.distributed.checkpoint as dcp

    from mr1fast.trainer.checkpoint import training_state
    saved = training_state(mixed, opt_mixed)
    assert saved["model"]["weight"].dtype == torch.float32
    assert torch.equal(saved["model"]["weight"], opt_mixed.master[0])
    dcp.save(saved, checkpoint_id=str(tmp_path / "w"), no_dist=True)
    fresh = torch.nn.Linear(8, 8).bfloat16()
    again = make_optimizer(fresh, lr=1e-6, weight_decay=0.0)
    dcp.load(training_state(fresh, again), checkpoint_id=str(tmp_path / "w"), no_dist=True)
    again.load_masters()
    assert torch.equal(again.master[0], opt_mixed.master[0])
    assert torch.equal(fresh.weight, mixed.weight)
    exp_avg = again.inner.state[again.master[0]]["exp_avg"]
    assert torch.equal(exp_avg, opt_mixed.inner.state[opt_mixed.master[0]]["exp_avg"])


def test_fp32_models_get_plain_adamw():
    assert isinstance(make_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.0), torch.optim.AdamW)


def test_lr_schedules():
    assert [lr_at(s, 10, 1.0, "constant", 0.2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(2, 10, 1.0, "cosine", 0.2) == pytest.approx(1.0)
    assert lr_at(9, 10, 1.0, "linear", 0.0) == pytest.approx(0.1)


def test_data_order_resumes_where_it_stopped():
    a = DataOrder(10, 4, seed=3)
    batches = [a.next() for _ in range(5)]
    assert sorted(batches[0] + batches[1]) == sorted(set(batches[0] + batches[1]))
    b = DataOrder(10, 4, seed=3)
    b.next(), b.next()
    c = DataOrder(10, 4, seed=3, **b.state())
    assert [c.next() for _ in range(3)] == batches[2:]
    with pytest.raises(ValueError, match="fewer than"):
        DataOrder(3, 4, seed=0)
