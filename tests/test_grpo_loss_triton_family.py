"""grpo_loss(impl="triton") on every option of the GRPO family against the fp64 reference (loss,
dH, dW, db, logp, stats), in fp32 and one bf16 case no worse than impl="torch"; the entropy
gradient of token_logprobs; no sync; no recompilation for a new coefficient or mode.

On a machine without CUDA the kernels run in Triton's CPU interpreter (conftest.py). Run as a
script (without TRITON_INTERPRET) this file prints the specialisation keys Triton would compile
for a series of launches (test_new_values_never_recompile).
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCES, assert_close, assert_no_worse_than_torch
from test_grpo_loss import make_case, reference_at, run
from test_no_sync import sync_calls  # noqa: F401 (the fixture)

from mr1fast import token_logprobs
from mr1fast.loss import OPTION_NAMES
from mr1fast.loss.fused import top_entropy_selection
from mr1fast.loss.reference import reference_token_logprobs

BASE = dict(B=4, T=5, d=32, V=200, loss_type="grpo", beta=0.05, old=True, ref=True, adv="seq",
            mask=True)
# Inputs beyond make_case's: importance weights per sequence ([S] "flat" or [S, 1] "column"),
# the sampler's log-probs, old log-probs 200 nats below the policy's at every other token (exp
# of the log-ratio would overflow fp32) and 30 above at the others, reference log-probs 200
# above; old log-probs 25 nats below and 25.5 above at each sequence's first two tokens (past
# VESPO's clamp of +-20, but summing to about 0).
EXTRAS = ("iw_per_sequence", "sampling", "old_overflow", "ref_overflow", "old_past_20")

# Each case: BASE's inputs (old and reference log-probs, per-sequence advantages, a mask with a
# fully masked sequence, beta > 0), updated by make_case keys, options and EXTRAS.
CASES = {
    # every loss type
    "grpo": {},
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8),
    "dapo": dict(loss_type="dapo", num_items=17),
    "cispo": dict(loss_type="cispo", eps_high=1.1),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.8),
    "luspo": dict(loss_type="luspo", adv="token"),
    "vespo_iw_per_token": dict(loss_type="vespo", iw=True, vespo_k_neg=2.5),
    "vespo_iw_per_sequence": dict(loss_type="vespo", iw_per_sequence="flat"),
    # ratio level and clipping
    "gspo": dict(importance_sampling_level="sequence"),
    "gspo_sapo_packed": dict(packed=[3, 1, 4, 2], importance_sampling_level="sequence",
                             loss_type="sapo"),
    "gspo_cispo": dict(importance_sampling_level="sequence", loss_type="cispo", eps_high=1.05),
    "gspo_on_policy_bias_kl": dict(importance_sampling_level="sequence", old=False,
                                   use_bias_correction_kl=True),
    "delta": dict(delta=1.1),
    "dual_clip": dict(dual_clip=1.3),
    "gspo_delta_dual_clip": dict(B=8, importance_sampling_level="sequence", delta=1.05,
                                 dual_clip=1.1),
    # KL estimators and the bias correction
    "k1": dict(kl_estimator="k1"),
    "k2": dict(kl_estimator="k2", log_ratio_clamp=0.5),
    "k3_bias_correction": dict(use_bias_correction_kl=True),
    "gspo_k2_bias_correction": dict(importance_sampling_level="sequence", kl_estimator="k2",
                                    use_bias_correction_kl=True),
    # entropy bonus and top-entropy selection (0.37: the quantile's rank is never an integer
    # here, so the threshold lies strictly between two tokens' entropies)
    "entropy_bonus": dict(entropy_coef=0.05, bias=True, temperature=0.7),
    "top_entropy": dict(top_entropy_quantile=0.37),
    "top_entropy_bonus_rewards": dict(top_entropy_quantile=0.37, entropy_coef=-0.03, rewards=2),
    # off-policy sequence mask, from the sampler's log-probs or (without them) old_logp
    "off_policy_mask_sampling": dict(off_policy_mask_threshold=0.0, sampling=True),
    "off_policy_mask_old": dict(off_policy_mask_threshold=0.1, adv="token"),
    # importance weights
    "iw_per_token": dict(iw=True),
    "iw_per_sequence": dict(iw_per_sequence="flat", loss_type="dapo"),
    "iw_per_sequence_column_gspo": dict(iw_per_sequence="column",
                                        importance_sampling_level="sequence"),
    # log-ratio overflow: finite, and the reference's gradients
    "overflow_grpo": dict(old_overflow=True),
    "overflow_gspo_bias_kl": dict(old_overflow=True, importance_sampling_level="sequence",
                                  use_bias_correction_kl=True),
    "overflow_sapo_ref": dict(old_overflow=True, ref_overflow=True, loss_type="sapo"),
    "overflow_dual_clip_k1": dict(old_overflow=True, ref_overflow=True, dual_clip=2.0,
                                  kl_estimator="k1"),
    "overflow_vespo": dict(old_overflow=True, loss_type="vespo"),
    "vespo_past_its_clamp": dict(old_past_20=True, loss_type="vespo"),
}


def family_case(spec, seed=0):
    """fp64 inputs of a case: (hidden, weight, targets, advantages, kwargs)."""
    spec = dict(spec)
    extras = {k: spec.pop(k) for k in EXTRAS if k in spec}
    options = {k: spec.pop(k) for k in OPTION_NAMES if k in spec}
    c = dict(BASE, **spec)
    hidden, weight, targets, adv, kw = make_case(c, seed)
    kw.update(options)
    g = torch.Generator().manual_seed(seed + 1)
    S = len(c["packed"]) if "packed" in c else c["B"]
    if "iw_per_sequence" in extras:
        w = 0.5 + torch.rand(S, generator=g)
        kw["importance_weights"] = w if extras["iw_per_sequence"] == "flat" else w[:, None]
    logp, _ = reference_token_logprobs(hidden.view(-1, c["d"]), weight, targets.view(-1),
                                       bias=kw["bias"], temperature=kw["temperature"])
    logp = logp.view(targets.shape)
    if extras.get("sampling"):
        kw["sampling_logp"] = (logp + 0.3 * torch.randn(logp.shape, generator=g,
                                                        dtype=torch.float64)).float()
    if extras.get("old_overflow"):
        even = torch.arange(logp.numel()).view(logp.shape) % 2 == 0
        kw["old_logp"] = torch.where(even, logp - 200.0, logp + 30.0).float()
    if extras.get("old_past_20"):
        kw["old_logp"][:, 0] = (logp[:, 0] - 25.0).float()
        kw["old_logp"][:, 1] = (logp[:, 1] + 25.5).float()
    if extras.get("ref_overflow"):
        kw["ref_logp"] = (logp + 200.0).float()
    return hidden, weight, targets, adv, kw


def compare(got, want, atol, rtol):
    """Loss, gradients, logp and every stat of `want` (run()'s triples). atol scales with the
    largest magnitude of each value: where the ratio overflows (exp(20) ~ 5e8 times the
    advantage or the KL) fp32's error is relative to the largest terms, for torch as well."""
    pairs = [("loss", got[0], want[0])] + [(k, got[2][k], w) for k, w in want[2].items()]
    assert set(got[1]) == set(want[1]), f"stats {sorted(got[1])} != {sorted(want[1])}"
    pairs += [(k, got[1][k], w) for k, w in want[1].items()]
    for name, g, w in pairs:
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        assert_close(name, g, w, atol * scale, rtol)


@pytest.mark.parametrize("check_values", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, check_values):
    """check_values=False sends the masked tokens to the kernels too (weight 0)."""
    inputs = family_case(CASES[case])
    kw = dict(inputs[4], check_values=check_values)
    want = reference_at(torch.float32, *inputs[:4], kw, entropy=True)
    got = run("triton", *inputs[:4], kw, torch.float32, entropy=True)
    assert torch.isfinite(got[0]) and all(torch.isfinite(x).all() for x in got[2].values())
    compare(got, want, *TOLERANCES[torch.float32])
    if case == "grpo":
        assert want[1]["clip_low"] > 0 and want[1]["clip_high"] > 0, "must clip both sides"


@pytest.mark.parametrize("case", ["gspo_k2_bias_correction", "top_entropy_bonus_rewards",
                                  "off_policy_mask_sampling", "vespo_iw_per_sequence"])
def test_checks_off_never_syncs(sync_calls, case):  # noqa: F811
    """With check_values=False neither the forward nor the backward reads a device value on the
    host (test_no_sync.py's instrument), the sequence sums and the top-entropy threshold
    included."""
    inputs = family_case(CASES[case])
    run("triton", *inputs[:4], dict(inputs[4], check_values=False), torch.float32, entropy=True)
    assert sync_calls == [], f"syncing calls: {sync_calls}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy
def test_vespo_weight_overflow_counts_zero():
    """VESPO's weight exp(lam + k log w - lam w) overflows fp32 for k < 0 at the lowest log w
    (sequences 0 and 2: A < 0, old log-probs 200 nats above): it counts 0, as the reference
    computed in fp32 has it (its nan_to_num); the fp64 reference does not overflow."""
    hidden, weight, targets, adv, kw = family_case(dict(loss_type="vespo", vespo_k_neg=-5.0))
    kw["old_logp"][::2] += 200.0
    assert (adv[::2] < 0).all() and reference_at(torch.float32, hidden, weight, targets, adv,
                                                 kw)[0].abs() > 1e30
    want = run("reference", hidden, weight, targets, adv, kw, torch.float32, entropy=True)
    got = run("triton", hidden, weight, targets, adv, kw, torch.float32, entropy=True)
    compare(got, want, *TOLERANCES[torch.float32])


@pytest.mark.parametrize("case", [c for c in CASES if set(CASES[c]) & set(OPTION_NAMES)
                                  - {"loss_type"}])
def test_every_option_of_a_case_changes_the_reference(case):
    """Each case exercises its options: without any one of them, the reference's loss or
    weight gradient differs."""
    want = reference_at(torch.float32, *family_case(CASES[case]), entropy=True)
    for name in set(CASES[case]) & set(OPTION_NAMES) - {"loss_type"}:
        spec = {k: v for k, v in CASES[case].items() if k != name}
        other = reference_at(torch.float32, *family_case(spec), entropy=True)
        assert not (torch.allclose(other[0], want[0], rtol=1e-9, atol=0)
                    and torch.allclose(other[2]["dW"], want[2]["dW"], rtol=1e-9, atol=0)), \
            f"{case}: {name} changes nothing"


def test_bf16_no_worse_than_torch():
    """bf16 inputs: the kernel's error vs the fp64 reference of the rounded inputs is within
    helpers' bound and HALF_MARGIN x impl="torch"'s error in bf16."""
    spec = dict(importance_sampling_level="sequence", use_bias_correction_kl=True,
                entropy_coef=0.05, delta=1.1, kl_estimator="k2", bias=True, temperature=0.9)
    inputs = family_case(spec, seed=3)
    want = reference_at(torch.bfloat16, *inputs, entropy=True)
    torch_got = run("torch", *inputs, torch.bfloat16, entropy=True)
    got = run("triton", *inputs, torch.bfloat16, entropy=True)
    for name, a, b, w in [("loss", got[0], torch_got[0], want[0])] + \
            [(k, got[1][k], torch_got[1][k], want[1][k]) for k in ("logp", "kl", "entropy")] + \
            [(k, got[2][k], torch_got[2][k], want[2][k]) for k in want[2]]:
        assert_no_worse_than_torch(name, a, b, w, torch.bfloat16)


def test_token_logprobs_differentiates_the_entropy():
    """token_logprobs(impl="triton") (TokenLogprobsFunction): d(sum u * logp + v * H), and
    d(sum v * H) alone, w.r.t. hidden, weight and bias equal the fp64 reference's."""
    g = torch.Generator().manual_seed(0)
    n, d, V, temperature = 9, 24, 301, 0.8
    h64 = torch.randn(n, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5 * 2
    b64 = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (n,), generator=g)
    u, v = torch.randn(2, n, generator=g, dtype=torch.float64)
    atol, rtol = TOLERANCES[torch.float32]
    for with_logp in (True, False):
        leaves = [x.float().requires_grad_() for x in (h64, w64, b64)]
        logp, ent = token_logprobs(leaves[0], leaves[1], y, bias=leaves[2],
                                   temperature=temperature, return_entropy=True, impl="triton")
        ((ent * v).sum() + ((logp * u).sum() if with_logp else 0.0)).backward()
        ref = [x.float().double().requires_grad_() for x in (h64, w64, b64)]
        r_logp, r_ent = reference_token_logprobs(ref[0], ref[1], y, bias=ref[2],
                                                 temperature=temperature)
        ((r_ent * v).sum() + ((r_logp * u).sum() if with_logp else 0.0)).backward()
        for name, a, b in zip(("dH", "dW", "db"), leaves, ref):
            assert_close(f"{name} (logp {with_logp})", a.grad, b.grad, atol, rtol)


# Every argument of the epilogue that carries an option's value or a coefficient: none may be
# tl.constexpr, and the integer modes are excluded from Triton's integer specialisation.
RUNTIME = {"beta", "adv_eps", "entropy_coef", "eps_low", "eps_high", "delta", "dual_clip",
           "log_ratio_clamp", "off_policy_threshold", "sapo_tau_pos", "sapo_tau_neg",
           "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "vespo_log_min",
           "vespo_log_max"}
MODES = {"policy", "kl_estimator", "sequence_ratio", "bias_correction_kl", "iw_per_sequence"}


def test_runtime_scalars_are_not_constexpr():
    from mr1fast.kernels import grpo_loss as gk
    fn = gk._grpo_loss_fwd_kernel
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    assert RUNTIME | MODES <= set(params)
    constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    assert constexpr == {"BLOCK_T", "BLOCK_G"}


# (name, options, launch arguments) of launches whose every kernel must reuse the first
# launch's compiled kernels: each changes one coefficient or mode of the first.
BASE_OPTIONS = dict(entropy_coef=0.01, top_entropy_quantile=0.5)
VARIANTS = [("base", {}, {})] + [
    (f"{k}={v}", {k: v}, {}) for k, v in [
        ("eps_low", 0.1), ("eps_high", 0.3), ("delta", 1.5), ("dual_clip", 2.0),
        ("log_ratio_clamp", 5.0), ("entropy_coef", -0.2), ("top_entropy_quantile", 0.2),
        ("off_policy_mask_threshold", 0.1), ("advantage_eps", 1e-6),
        ("sapo_temperature_pos", 0.5), ("sapo_temperature_neg", 2.0), ("vespo_k_pos", 1.0),
        ("vespo_lambda_pos", 1.0), ("vespo_k_neg", 1.0), ("vespo_lambda_neg", 1.0),
        ("kl_estimator", "k1"), ("kl_estimator", "k2"), ("importance_sampling_level", "sequence"),
        ("use_bias_correction_kl", True)]
] + [(f"loss_type={t}", {"loss_type": t}, {}) for t in ("bnpo", "cispo", "sapo", "vespo")] + [
    ("beta=0.3", {}, {"beta": 0.3}), ("temperature=0.7", {}, {"temperature": 0.7}),
    ("iw_per_sequence", {}, {"iw_per_sequence": True}),
]


def specialisation_keys():
    """For each VARIANTS launch (forward and backward with entropy gradient, on small CPU
    tensors, the launch itself replaced), the keys of Triton's kernel cache that its kernels
    would be compiled or found under on sm_90. Needs the real JIT (no TRITON_INTERPRET)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from mr1fast.kernels import grpo_loss as gk
    from mr1fast.kernels import token_logprobs as tk
    from mr1fast.loss import LossOptions

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys = []

    def record(self, *args, grid, warmup, **kwargs):
        bind = create_function_from_signature(self.signature, self.params, backend)
        _, specialisation, options = bind(*args, **kwargs)
        keys.append(f"{self.__name__} {specialisation} {sorted(options.items())}")

    JITFunction.run = record
    g = torch.Generator().manual_seed(0)
    n, d, V = 12, 16, 40
    h, w = torch.randn(n, d, generator=g), torch.randn(V, d, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    t = torch.rand(n, generator=g)
    out = {}
    for name, options, launch in VARIANTS:
        keys.clear()
        launch = dict(dict(beta=0.05, temperature=1.0, iw_per_sequence=False), **launch)
        options = LossOptions(**dict(BASE_OPTIONS, **options))
        gk.grpo_loss_forward(
            h, w, None, y, options, scale=t,
            cu_seqlens=torch.tensor([0, 5, 9, 12, 12]), vespo_log_range=(-18.4, 20.0),
            rewards=torch.rand(4, generator=g), group_size=2, old_logp=t, ref_logp=t,
            importance_weights=t, sampling_logp=t, mask=t,
            top_entropy=top_entropy_selection(options.top_entropy_quantile),
            **launch)
        tk.token_logprobs_backward(h, w, None, y, t, t, launch["temperature"], entropy=t,
                                   grad_entropy=t)
        out[name] = list(keys)
    return out


def test_new_values_never_recompile():
    """Every coefficient and mode of the objective (and beta, temperature) is a runtime value:
    changing one gives the same Triton specialisation keys, i.e. no new compilation. (An
    absent optional input, e.g. no top-entropy mask, is a specialisation of its own.)"""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).resolve()
    res = subprocess.run([sys.executable, str(here)], capture_output=True, text=True, env=env,
                         cwd=here.parent.parent, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    keys = json.loads(res.stdout)
    assert len(keys["base"]) == 4, keys["base"]  # log-probs, merge, epilogue, backward
    changed = [name for name, k in keys.items() if k != keys["base"]]
    assert changed == [], f"these changes would recompile a kernel: {changed}"


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"
    print(json.dumps(specialisation_keys()))
