"""impl="naive": TRL's code path, a baseline for tests and benchmarks, never a default.

The full [..., V] logits in the input dtype, then a selective log-softmax (gather minus
logsumexp for fp32/fp64; a per-row log_softmax for half dtypes), as TRL's GRPOTrainer does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0,
                         want_entropy=False, entropy_grad=False):
    """fp32 logp [...] (fp64 for fp64 inputs) and, when want_entropy, the entropy (else None;
    differentiable when entropy_grad). The entropy costs another full-vocabulary pass, so the
    baseline only pays it when asked."""
    logits = F.linear(hidden, weight, bias)
    logits = logits / temperature
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logp = picked - torch.logsumexp(logits, dim=-1)
    else:
        rows = logits if logits.dim() > 2 else logits.unsqueeze(0)
        row_targets = targets if logits.dim() > 2 else targets.unsqueeze(0)
        logp = torch.stack([torch.log_softmax(r, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
                            for r, t in zip(rows, row_targets)]).view(targets.shape)
    entropy = None
    if want_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            logsm = torch.log_softmax(logits.float() if logits.dtype != torch.float64
                                      else logits, dim=-1)
            entropy = -(logsm.exp() * logsm).sum(-1)
    return logp.float() if logp.dtype != torch.float64 else logp, entropy
