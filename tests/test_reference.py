"""The specification itself, checked against TRL's loss definitions written out by hand."""
import pytest
import torch

from mr1fast.loss.reference import reference_grpo_loss


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_types_follow_trl(loss_type):
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 4, 8, 11
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    beta, eps_lo, eps_hi = 0.05, 0.2, 0.28
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None]).squeeze(-1)
    ratio = torch.exp(logp - old)
    pg = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi) * adv[:, None])
    per_tok = pg + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    want = {
        "grpo": ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean(),
        "bnpo": (per_tok * mask).sum() / mask.sum().clamp(min=1),
        "dr_grpo": (per_tok * mask).sum() / (B * 6),
        "dapo": (per_tok * mask).sum() / 9,
    }[loss_type]
    got, _ = reference_grpo_loss(h, w, y, adv, mask=mask, old_logp=old, ref_logp=ref, beta=beta,
                                 eps_low=eps_lo, eps_high=eps_hi, loss_type=loss_type,
                                 max_completion_length=6, num_items_in_batch=9)
    assert torch.allclose(got, want, atol=1e-12)
