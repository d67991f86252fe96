"""The GRPO family's options (mr1fast.loss.options): the spec's own properties, and the naive
and torch impls against the fp64 reference, loss, gradients and stats, in every dtype. The
Triton impl's family tests are in test_grpo_loss_triton_family.py."""
import math

import pytest
import torch
from helpers import TOLERANCES, assert_close, assert_no_worse_than_torch

import mr1fast.loss.chunked as chunked
from mr1fast import LossOptions, grpo_loss
from mr1fast.loss.reference import reference_grpo_loss, reference_token_logprobs

B, T, D, V = 4, 6, 24, 97


def make_inputs(seed=0, packed=False, old_shift=0.0):
    """fp64 hidden, weight, targets, bias and per-token inputs with a fully masked sequence;
    old_logp far enough from logp that both clip sides fire."""
    g = torch.Generator().manual_seed(seed)
    b, t = (1, B * T) if packed else (B, T)
    h = torch.randn(b, t, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5 * 2
    y = torch.randint(0, V, (b, t), generator=g)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    logp, _ = reference_token_logprobs(h, w, y, bias=bias)
    mask = (torch.rand(b, t, generator=g) > 0.2).double()
    if packed:
        mask[0, T:2 * T] = 0
    else:
        mask[1] = 0
    kw = dict(bias=bias, mask=mask,
              old_logp=logp + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64) - old_shift,
              ref_logp=logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64),
              sampling_logp=logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64),
              beta=0.05)
    if packed:
        kw["cu_seqlens"] = torch.arange(B + 1) * T
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return h, w, y, adv, kw


# Each case: options (and input changes). Together: every loss type at both levels where TRL
# allows it, every clip, estimator, mask and weight option, on- and off-policy, packed.
CASES = {
    **{lt: dict(loss_type=lt) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo",
                                          "luspo", "vespo")},
    "gspo": dict(importance_sampling_level="sequence"),
    "gspo_luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "gspo_cispo_packed": dict(loss_type="cispo", importance_sampling_level="sequence",
                              eps_high=1.1, packed=True),
    "sapo_sequence": dict(loss_type="sapo", importance_sampling_level="sequence"),
    "delta_dual_clip": dict(delta=1.25, dual_clip=1.5, eps_high=0.28),
    "k1": dict(kl_estimator="k1"), "k2": dict(kl_estimator="k2"),
    "k3_bias_corrected": dict(use_bias_correction_kl=True, loss_type="dapo"),
    "gspo_bias_corrected": dict(use_bias_correction_kl=True,
                                importance_sampling_level="sequence"),
    "on_policy_bias_corrected": dict(use_bias_correction_kl=True, old_logp=None),
    "entropy_bonus": dict(entropy_coef=0.3, temperature=0.8),
    "top_entropy": dict(top_entropy_quantile=0.37, entropy_coef=0.1),
    "off_policy_mask": dict(off_policy_mask_threshold=0.05),
    "off_policy_mask_no_sampler": dict(off_policy_mask_threshold=-0.1, sampling_logp=None),
    "iw_per_sequence": dict(iw="seq"), "iw_per_sequence_b1": dict(iw="seq1"),
    "iw_per_token": dict(iw="token", loss_type="bnpo"),
    "vespo_iw_token": dict(loss_type="vespo", iw="token"),
    "vespo_iw_sequence": dict(loss_type="vespo", iw="seq"),
    "token_advantages_rewards_eps": dict(rewards=True, advantage_eps=0.5),
}


def case_inputs(name, seed=0):
    c = dict(CASES[name])
    h, w, y, adv, kw = make_inputs(seed, packed=c.pop("packed", False))
    g = torch.Generator().manual_seed(seed + 100)
    iw = c.pop("iw", None)
    if iw == "seq":
        kw["importance_weights"] = 0.5 + torch.rand(B, generator=g, dtype=torch.float64)
    elif iw == "seq1":
        kw["importance_weights"] = 0.5 + torch.rand(B, 1, generator=g, dtype=torch.float64)
    elif iw == "token":
        kw["importance_weights"] = 0.5 + torch.rand(y.shape, generator=g, dtype=torch.float64)
    if c.pop("rewards", False):
        adv = None
        kw["rewards"] = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
        kw["group_size"] = 2
    for k in ("old_logp", "sampling_logp"):
        if k in c and c[k] is None:
            del kw[k]
            del c[k]
    kw.update(c)
    return h, w, y, adv, kw


def run(impl, h, w, y, adv, kw, dtype):
    """(loss, stats, grads) of one impl at dtype; per-token float inputs stay fp32 (fp64 for
    the reference), as a trainer passes them."""
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    hh = h.to(dtype).requires_grad_()
    ww = w.to(dtype).requires_grad_()
    kw = {k: (v.to(fdt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    kw["bias"] = kw["bias"].detach().to(dtype).requires_grad_()
    a = None if adv is None else adv.to(fdt)
    if impl == "reference":
        loss, stats = reference_grpo_loss(hh, ww, y, a, return_entropy=True, **kw)
    else:
        loss, stats = grpo_loss(hh, ww, y, a, return_entropy=True, impl=impl, **kw)
    loss.backward()
    return loss, stats, {"dH": hh.grad, "dW": ww.grad, "db": kw["bias"].grad}


def reference_at(dtype, h, w, y, adv, kw):
    r = lambda x: x.to(dtype).double()  # noqa: E731  the dtype-rounded inputs, in fp64
    kw = dict(kw, bias=r(kw["bias"]))
    return run("reference", r(h), r(w), y, adv, kw, torch.float64)


STATS = ("kl", "clip_low", "clip_high", "clip_frac", "entropy")


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, impl):
    inputs = case_inputs(case)
    ref_loss, ref_stats, ref_grads = reference_at(torch.float32, *inputs)
    loss, stats, grads = run(impl, *inputs, torch.float32)
    atol, rtol = TOLERANCES[torch.float32]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss, ref_loss, atol, rtol)
    for k, g in ref_grads.items():
        assert_close(k, grads[k], g, atol, rtol)
    assert_close("logp", stats["logp"], ref_stats["logp"], atol, rtol)
    for k in STATS + (("phi_mean",) if "phi_mean" in ref_stats else ()):
        assert_close(k, stats[k], ref_stats[k], atol, rtol)
    assert ref_grads["dW"].abs().max() > 1e-6, "the case must have a gradient"


@pytest.mark.parametrize("case", ["grpo", "gspo", "entropy_bonus", "vespo_iw_token"])
def test_torch_fp64_equals_reference(case):
    inputs = case_inputs(case)
    ref_loss, _, ref_grads = reference_at(torch.float64, *inputs)
    loss, _, grads = run("torch", *inputs, torch.float64)
    assert_close("loss", loss, ref_loss, 1e-12, 1e-10)
    for k, g in ref_grads.items():
        assert_close(k, grads[k], g, 1e-12, 1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["dapo", "gspo", "entropy_bonus"])
def test_half_no_worse_than_naive(case, dtype):
    inputs = case_inputs(case, seed=1)
    ref_loss, _, ref_grads = reference_at(dtype, *inputs)
    naive = run("naive", *inputs, dtype)
    ours = run("torch", *inputs, dtype)
    assert_no_worse_than_torch("loss", ours[0], naive[0], ref_loss, dtype)
    for k in ref_grads:
        assert_no_worse_than_torch(k, ours[2][k], naive[2][k], ref_grads[k], dtype)


@pytest.mark.parametrize("case", ["grpo", "entropy_bonus", "gspo", "top_entropy"])
def test_chunking_does_not_change_results(case, monkeypatch):
    """Many small row chunks (both the one-pass and the two-pass path) equal one chunk."""
    inputs = case_inputs(case)
    one = run("torch", *inputs, torch.float32)
    monkeypatch.setattr(chunked, "_rows", lambda V, d: 5)  # 5 rows per chunk
    many = run("torch", *inputs, torch.float32)
    assert_close("loss", many[0], one[0], 1e-6, 1e-5)
    for k in one[2]:
        assert_close(k, many[2][k], one[2][k], 1e-6, 1e-5)


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", ["grpo", "gspo", "k3_bias_corrected", "sapo"])
def test_ratio_overflow_gives_finite_equal_gradients(case, impl):
    """old_logp 200 nats below logp: exp(log-ratio) overflows fp32 without the clamp."""
    h, w, y, adv, kw = case_inputs(case)
    kw["old_logp"] = kw["old_logp"] - 200.0
    kw["ref_logp"] = kw["ref_logp"] + 200.0  # and exp(ref - logp) in k3
    ref_loss, _, ref_grads = reference_at(torch.float32, h, w, y, adv, kw)
    loss, _, grads = run(impl, h, w, y, adv, kw, torch.float32)
    assert torch.isfinite(ref_loss)
    assert_close("loss", loss, ref_loss, 1e-4, 1e-4)
    for k, g in ref_grads.items():
        assert torch.isfinite(grads[k]).all(), k
        assert_close(k, grads[k], g, 1e-4, 1e-4)


# --- the specification's own properties (TRL 1.16's definitions, written out by hand) ---

def _logp_inputs():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 3), generator=g)
    logp, ent = reference_token_logprobs(h, w, y)
    return h, w, y, logp, ent


def test_gspo_ratio_is_the_exp_of_the_mean_log_ratio():
    h, w, y, logp, _ = _logp_inputs()
    old = logp + torch.tensor([[0.1, -0.3, 0.2], [0.4, 0.4, -0.2]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    per_seq = -torch.min(s * adv, s.clamp(0.8, 1.2) * adv)
    want = per_seq.mean()  # grpo: each token carries its sequence's loss
    got, stats = reference_grpo_loss(h, w, y, adv, mask=mask, old_logp=old,
                                     importance_sampling_level="sequence")
    assert torch.allclose(got, want, atol=1e-12)
    clipped = ((s < 0.8) & (adv < 0)).double().mean()
    assert torch.allclose(stats["clip_low"].double(), clipped, atol=1e-7)


def test_on_policy_ratio_is_one_with_gradient():
    h, w, y, logp, _ = _logp_inputs()
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    hh = h.clone().requires_grad_()
    loss, _ = reference_grpo_loss(hh, w, y, adv, loss_type="bnpo")
    assert torch.allclose(loss, -(adv[:, None].expand(2, 3)).mean())
    loss.backward()
    hh2 = h.clone().requires_grad_()
    (-adv[:, None] * reference_token_logprobs(hh2, w, y)[0]).mean().backward()
    assert torch.allclose(hh.grad, hh2.grad, atol=1e-12)


def test_sapo_at_ratio_one_is_two_over_tau():
    h, w, y, logp, _ = _logp_inputs()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = reference_grpo_loss(h, w, y, adv, loss_type="sapo", sapo_temperature_pos=0.5,
                                  sapo_temperature_neg=2.0)
    assert torch.allclose(loss, torch.tensor((-2 / 0.5 * 1 + 2 / 2.0 * 1) / 2,
                                             dtype=torch.float64))


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    h, w, y, logp, _ = _logp_inputs()
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    old = logp - 3.0  # ratio e^3 ~ 20: unbounded -r * A without the dual clip
    plain, _ = reference_grpo_loss(h, w, y, adv, old_logp=old, loss_type="bnpo")
    dual, _ = reference_grpo_loss(h, w, y, adv, old_logp=old, loss_type="bnpo", dual_clip=3.0)
    assert torch.allclose(plain, torch.tensor(math.exp(3.0), dtype=torch.float64))
    assert torch.allclose(dual, torch.tensor(3.0, dtype=torch.float64))


def test_kl_estimators():
    h, w, y, logp, _ = _logp_inputs()
    ref = logp + 0.3
    adv = torch.zeros(2, dtype=torch.float64)
    want = {"k1": -0.3, "k2": 0.045, "k3": math.exp(0.3) - 0.3 - 1}
    for est, v in want.items():
        loss, stats = reference_grpo_loss(h, w, y, adv, ref_logp=ref, beta=1.0, kl_estimator=est,
                                          loss_type="bnpo")
        assert math.isclose(loss.item(), v, rel_tol=1e-9), est
        assert math.isclose(stats["kl"].item(), v, rel_tol=1e-6), est


def test_top_entropy_trains_on_the_highest_entropy_tokens_only():
    h, w, y, logp, ent = _logp_inputs()
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    hh = h.clone().requires_grad_()
    loss, _ = reference_grpo_loss(hh, w, y, adv, loss_type="bnpo", top_entropy_quantile=0.34)
    loss.backward()
    keep = ent >= torch.quantile(ent.flatten(), 0.66)
    assert keep.sum() == 2
    # tokens outside the top entropies get no gradient; the normaliser still counts them
    assert (hh.grad[~keep].abs().sum(-1) == 0).all() and (hh.grad[keep].abs().sum(-1) > 0).all()
    assert torch.allclose(loss, torch.tensor(-2 / 6, dtype=torch.float64))


def test_off_policy_mask_drops_only_stale_negative_sequences():
    h, w, y, logp, _ = _logp_inputs()
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    sampling = logp.clone()
    sampling[0] += 0.5  # sequence 0: the sampler's log-probs 0.5 nats above the policy's
    loss, _ = reference_grpo_loss(h, w, y, adv, sampling_logp=sampling, loss_type="bnpo",
                                  off_policy_mask_threshold=0.1)
    assert torch.allclose(loss, torch.tensor(0.5, dtype=torch.float64))  # only sequence 1
    loss, _ = reference_grpo_loss(h, w, y, -adv, sampling_logp=sampling, loss_type="bnpo",
                                  off_policy_mask_threshold=0.1)
    assert torch.allclose(loss, torch.tensor(-1.0, dtype=torch.float64))  # A >= 0 kept


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy():
    h, w, y, logp, ent = _logp_inputs()
    adv = torch.zeros(2, dtype=torch.float64)
    loss, _ = reference_grpo_loss(h, w, y, adv, entropy_coef=0.5)
    assert torch.allclose(loss, -0.5 * ent.mean())


@pytest.mark.parametrize("bad, match", [
    (dict(loss_type="ppo"), "loss_type"), (dict(importance_sampling_level="seq"),
                                           "importance_sampling_level"),
    (dict(kl_estimator="k4"), "kl_estimator"), (dict(delta=0.9), "delta"),
    (dict(dual_clip=1.0), "dual_clip"), (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(log_ratio_clamp=0), "log_ratio_clamp"), (dict(entropy_coef=float("nan")), "entropy_coef"),
    (dict(use_bias_correction_kl=1), "use_bias_correction_kl"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg")])
def test_bad_options_raise_naming_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        LossOptions(**bad)
    h, w, y, adv, kw = make_inputs()
    with pytest.raises(ValueError, match=match):
        grpo_loss(h, w, y, adv, impl="torch", **dict(kw, **bad))


def test_importance_weights_shapes():
    h, w, y, adv, kw = make_inputs()
    with pytest.raises(ValueError, match="importance_weights"):
        grpo_loss(h, w, y, adv, importance_weights=torch.ones(B + 1), impl="torch", **kw)
    a, _ = grpo_loss(h, w, y, adv, importance_weights=torch.full((B,), 0.5, dtype=h.dtype),
                     impl="torch", **kw)
    b, _ = grpo_loss(h, w, y, adv, importance_weights=torch.full((B, T), 0.5, dtype=h.dtype),
                     impl="torch", **kw)
    assert torch.allclose(a, b, atol=1e-12)


def test_a_tensor_beta_above_zero_needs_ref_logp():
    h, w, y, adv, kw = make_inputs()
    del kw["ref_logp"]
    kw["beta"] = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match="ref_logp: required"):
        grpo_loss(h, w, y, adv, impl="torch", **kw)
    kw["beta"] = torch.tensor(0.0, dtype=torch.float64)
    assert torch.isfinite(grpo_loss(h, w, y, adv, impl="torch", **kw)[0])


def test_masked_quantile_equals_torch_quantile():
    from mr1fast.loss.reference import masked_quantile
    g = torch.Generator().manual_seed(4)
    for n in (1, 2, 7, 30):
        x = torch.randn(n, generator=g)
        valid = torch.rand(n, generator=g) > 0.3
        for q in (0.0, 0.2, 0.63, 1.0):
            got = masked_quantile(x, valid, q)
            want = torch.quantile(x[valid], q) if valid.any() else torch.tensor(float("inf"))
            assert torch.allclose(got, want, atol=1e-6), (n, q)


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", ["vespo", "gspo", "gspo_cispo_packed", "top_entropy"])
def test_checks_off_gives_the_same_results(case, impl):
    """check_values=False computes the masked tokens too: the loss, gradients and every stat
    (the per-sequence ones included) must not change."""
    h, w, y, adv, kw = case_inputs(case)
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    out = {}
    for checks in (True, False):
        hh = h.float().requires_grad_()
        loss, stats = grpo_loss(hh, w.float(), y, adv.float(), return_entropy=True, impl=impl,
                                check_values=checks, **kw)
        loss.backward()
        out[checks] = (loss, stats, hh.grad)
    assert_close("loss", out[False][0], out[True][0], 1e-6, 1e-5)
    assert_close("dH", out[False][2], out[True][2], 1e-6, 1e-5)
    for k, v in out[True][1].items():
        assert_close(k, out[False][1][k], v, 1e-6, 1e-5)


def test_no_grad_forms_no_gradients(monkeypatch):
    """Under torch.no_grad (an eval loop), the torch impl does no gradient work even when the
    inputs require grad: the same loss, and no gradient buffers."""
    h, w, y, adv, kw = case_inputs("grpo")
    h, w = h.float().requires_grad_(), w.float().requires_grad_()
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    want, _ = grpo_loss(h, w, y, adv.float(), impl="torch", **kw)
    made = []
    monkeypatch.setattr(chunked, "_Grads", lambda *a: made.append(1))
    with torch.no_grad():
        got, _ = grpo_loss(h, w, y, adv.float(), impl="torch", **kw)
    assert made == [] and torch.equal(got, want.detach())


def test_a_second_backward_through_the_torch_loss_is_a_clear_error():
    h, w, y, adv, kw = case_inputs("grpo")
    hh = h.float().requires_grad_()
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    loss, _ = grpo_loss(hh, w.float(), y, adv.float(), impl="torch", **kw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("impl", ["naive", "torch", "triton"])
def test_nan_sampler_logprobs_count_as_zero_in_the_off_policy_mask(impl):
    """vLLM leaves NaN where it cannot score a token; like TRL, the off-policy estimate counts
    such a token as 0 (checks off: nothing rejects the NaN)."""
    h, w, y, adv, kw = case_inputs("off_policy_mask")
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    nan = kw["sampling_logp"].clone()
    nan[0, 1] = float("nan")
    assert kw["mask"][0, 1] == 1 and adv[0] < 0, "the NaN must sit in a live, negative row"
    zero = kw["sampling_logp"].clone()
    lp, _ = reference_token_logprobs(h.float(), w.float(), y, bias=kw["bias"])
    zero[0, 1] = lp[0, 1]  # a gap of 0 at that token
    a, _ = grpo_loss(h.float(), w.float(), y, adv.float(), impl=impl, check_values=False,
                     **dict(kw, sampling_logp=nan))
    b, _ = grpo_loss(h.float(), w.float(), y, adv.float(), impl=impl, check_values=False,
                     **dict(kw, sampling_logp=zero))
    assert torch.isfinite(a) and torch.allclose(a, b, atol=1e-6)


def test_top_entropy_in_fp64_keeps_the_boundary_token():
    """quantile 0 keeps exactly the highest-entropy token(s), whatever the dtype."""
    from mr1fast.loss.reference import top_entropy_mask
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        h = torch.rand(9, generator=g, dtype=torch.float64) * 5
        m = torch.ones(9, dtype=torch.float64)
        assert top_entropy_mask(h, m, 0.0).sum() == 1


def test_cispo_takes_an_eps_low_above_one():
    """cispo, sapo and vespo never read eps_low (TRL passes epsilon there)."""
    assert LossOptions(loss_type="cispo", eps_low=5.0).eps_high == 5.0
    with pytest.raises(ValueError, match="eps_low"):
        LossOptions(loss_type="grpo", eps_low=5.0)
