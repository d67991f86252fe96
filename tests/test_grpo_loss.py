"""grpo_loss: every impl against the fp64 reference (loss, dH, dW, db, logp, stats)."""
import inspect

import pytest
import torch
from helpers import TOLERANCES, assert_close, assert_no_worse_than_torch

import mr1fast
from mr1fast import GRPOLoss, group_advantages, grpo_loss
from mr1fast.loss.reference import reference_grpo_loss, reference_token_logprobs

IMPLS = ["naive", "torch", "triton"]

# Each case covers several features; together they cover every loss type, beta 0 and > 0,
# on- and off-policy (both clip sides), importance weights, rewards + group_size, masks with a
# fully masked sequence, temperature != 1, per-sequence and per-token advantages, bias, the
# packed layout, odd sizes and entropy.
CASES = {
    "grpo_offpolicy_kl_bias_temp": dict(B=4, T=6, d=64, V=300, loss_type="grpo", beta=0.05,
                                        old=True, ref=True, adv="seq", bias=True,
                                        temperature=0.7, mask=True, entropy=True),
    "bnpo_onpolicy_iw_token_adv": dict(B=4, T=5, d=48, V=257, loss_type="bnpo", beta=0.0,
                                       adv="token", iw=True, mask=True),
    "dr_grpo_rewards_groups": dict(B=6, T=5, d=32, V=200, loss_type="dr_grpo", beta=0.02,
                                   old=True, ref=True, rewards=3, max_completion_length=8,
                                   mask=True, entropy=True),
    "dapo_packed_iw": dict(packed=[3, 1, 4, 2], d=40, V=333, loss_type="dapo", beta=0.1,
                           old=True, ref=True, adv="seq", iw=True, num_items=17, mask=True),
    "grpo_T1_d80_V1000": dict(B=3, T=1, d=80, V=1000, loss_type="grpo", beta=0.04, old=True,
                              ref=True, adv="seq"),
    "grpo_packed_rewards": dict(packed=[2, 3, 1, 4], d=32, V=130, loss_type="grpo", beta=0.0,
                                old=True, rewards=2, temperature=1.3),
}


def make_case(c, seed=0):
    """fp64 inputs for a case: (hidden, weight, targets, advantages, kwargs)."""
    g = torch.Generator().manual_seed(seed)
    d, V = c["d"], c["V"]
    if "packed" in c:
        lens = c["packed"]
        B, T = 1, sum(lens)
        cu = torch.tensor([0] + lens).cumsum(0)
        S = len(lens)
    else:
        B, T, S, cu = c["B"], c["T"], c["B"], None
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) / d ** 0.5 * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if c.get("bias") else None
    kw = dict(loss_type=c["loss_type"], beta=c["beta"], bias=bias,
              temperature=c.get("temperature", 1.0))
    true_logp, _ = reference_token_logprobs(hidden, weight, targets, bias=bias,
                                            temperature=kw["temperature"])
    if c.get("old"):  # far enough from logp that both clip sides fire
        kw["old_logp"] = (true_logp + 0.4 * torch.randn(B, T, generator=g,
                                                        dtype=torch.float64)).float()
    if c.get("ref"):
        kw["ref_logp"] = (true_logp + 0.3 * torch.randn(B, T, generator=g,
                                                        dtype=torch.float64)).float()
    if c.get("iw"):
        kw["importance_weights"] = (0.5 + torch.rand(B, T, generator=g)).float()
    if c.get("mask"):
        mask = (torch.rand(B, T, generator=g) > 0.25).float()
        if cu is None:
            mask[1] = 0  # a fully masked sequence
        else:
            mask[0, cu[1]:cu[2]] = 0
        kw["mask"] = mask
    if "max_completion_length" in c:
        kw["max_completion_length"] = c["max_completion_length"]
    if "num_items" in c:
        kw["num_items_in_batch"] = c["num_items"]
    if cu is not None:
        kw["cu_seqlens"] = cu
    advantages = None
    if c.get("rewards"):
        kw["rewards"] = torch.randint(0, 3, (S,), generator=g).float()
        kw["rewards"][: c["rewards"]] = 1.0  # one group of equal rewards: zero advantages
        kw["group_size"] = c["rewards"]
    elif c["adv"] == "seq":
        advantages = torch.randn(S, generator=g)
    else:
        advantages = torch.randn(B, T, generator=g)
    return hidden, weight, targets, advantages, kw


def run(impl, hidden, weight, targets, advantages, kw, dtype, entropy=False):
    """Loss, stats and gradients (dH, dW, db) of one impl at dtype."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    kw = dict(kw)
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].to(dtype).requires_grad_()
    if impl == "reference":
        loss, stats = reference_grpo_loss(h, w, targets, advantages, return_entropy=entropy,
                                          **kw)
    else:
        loss, stats = grpo_loss(h, w, targets, advantages, return_entropy=entropy, impl=impl,
                                **kw)
    loss.backward()
    grads = {"dH": h.grad, "dW": w.grad}
    if kw.get("bias") is not None:
        grads["db"] = kw["bias"].grad
    return loss, stats, grads


def reference_at(dtype, hidden, weight, targets, advantages, kw, entropy=False):
    """The fp64 ground truth from the dtype-rounded inputs."""
    kw = dict(kw)
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].to(dtype).double()
    return run("reference", hidden.to(dtype).double(), weight.to(dtype).double(), targets,
               None if advantages is None else advantages.double(), kw, torch.float64, entropy)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case, impl):
    c = CASES[case]
    inputs = make_case(c)
    entropy = c.get("entropy", False)
    ref_loss, ref_stats, ref_grads = reference_at(torch.float32, *inputs, entropy=entropy)
    loss, stats, grads = run(impl, *inputs, torch.float32, entropy=entropy)
    atol, rtol = TOLERANCES[torch.float32]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", loss, ref_loss, atol, rtol)
    for k, ref_g in ref_grads.items():
        assert_close(k, grads[k], ref_g, atol, rtol)
    assert stats["logp"].dtype == torch.float32
    assert_close("logp", stats["logp"], ref_stats["logp"], atol, rtol)
    for k in ("kl", "clip_low", "clip_high", "clip_frac") + (("entropy",) if entropy else ()):
        assert_close(k, stats[k], ref_stats[k], atol, rtol)
    if c.get("old") and c["loss_type"] == "grpo" and "packed" not in c and c["T"] > 1:
        assert ref_stats["clip_low"] > 0 and ref_stats["clip_high"] > 0, "case must clip both sides"


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_no_worse_than_torch(dtype, impl):
    """Half inputs: error vs the fp64 reference of the rounded inputs within an absolute bound
    and at most HALF_MARGIN x torch's own error in that dtype (the naive path)."""
    inputs = make_case(CASES["grpo_offpolicy_kl_bias_temp"], seed=1)
    ref_loss, ref_stats, ref_grads = reference_at(dtype, *inputs)
    naive = run("naive", *inputs, dtype)
    ours = run(impl, *inputs, dtype)
    pairs = [("loss", ours[0], naive[0], ref_loss), ("logp", ours[1]["logp"], naive[1]["logp"],
                                                     ref_stats["logp"])]
    pairs += [(k, ours[2][k], naive[2][k], ref_grads[k]) for k in ref_grads]
    for name, got, torch_got, want in pairs:
        assert_no_worse_than_torch(name, got, torch_got, want, dtype)


def test_triton_deterministic():
    inputs = make_case(CASES["grpo_offpolicy_kl_bias_temp"])
    a = run("triton", *inputs, torch.float32)
    b = run("triton", *inputs, torch.float32)
    assert torch.equal(a[0], b[0])
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), f"{k} differs between identical runs"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_rewards_equal_group_advantages(impl):
    hidden, weight, targets, _, kw = make_case(CASES["dr_grpo_rewards_groups"])
    rewards, g = kw.pop("rewards"), kw.pop("group_size")
    a = run(impl, hidden, weight, targets, None, dict(kw, rewards=rewards, group_size=g),
            torch.float32)
    b = run(impl, hidden, weight, targets, group_advantages(rewards, g), kw, torch.float32)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close("loss", a[0], b[0], atol, rtol)
    for k in a[2]:
        assert_close(k, a[2][k], b[2][k], atol, rtol)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_beta_tensor_equals_float(impl):
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_T1_d80_V1000"])
    a = run(impl, hidden, weight, targets, adv, kw, torch.float32)
    b = run(impl, hidden, weight, targets, adv, dict(kw, beta=torch.tensor(kw["beta"])),
            torch.float32)
    assert torch.allclose(a[0], b[0], atol=1e-7)
    assert torch.allclose(a[2]["dH"], b[2]["dH"], atol=1e-7)


def _constexpr_params(kernel):
    fn = getattr(kernel, "fn", kernel)
    while hasattr(fn, "fn"):
        fn = fn.fn
    sig = inspect.signature(fn)
    return {n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)}


def test_runtime_scalars_are_not_constexpr():
    from mr1fast.kernels import grpo_loss as gk
    from mr1fast.kernels import token_logprobs as tk
    kernels = [tk._token_logprobs_fwd_kernel, tk._token_logprobs_bwd_kernel,
               tk._logits_tile, gk._grpo_loss_fwd_kernel]
    for k in kernels:
        cx = _constexpr_params(k)
        assert cx, "signature inspection found no constexpr at all"
        params = set(inspect.signature(getattr(k, "fn", k)).parameters)
        runtime = {"beta_ptr", "beta", "adv_eps", "inv_temperature", "eps_low", "eps_high"} & params
        assert not runtime & cx, f"{runtime & cx} must be runtime arguments"
    assert {"beta_ptr", "beta", "adv_eps", "eps_low", "eps_high"} <= set(
        inspect.signature(gk._grpo_loss_fwd_kernel.fn).parameters)


@pytest.mark.cuda
def test_beta_changes_never_recompile_on_gpu():
    from mr1fast.kernels import grpo_loss as gk
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_offpolicy_kl_bias_temp"])
    to = (lambda x: x.cuda() if isinstance(x, torch.Tensor) else x)
    kw = {k: to(v) for k, v in kw.items()}
    args = [to(x) for x in (hidden.float(), weight.float(), targets, adv)]

    def n_compiled():
        caches = gk._grpo_loss_fwd_kernel.device_caches
        return sum(len(c[0]) for c in caches.values())

    # One specialisation for a float beta, one for a tensor (a pointer): then none for values.
    grpo_loss(*args, **dict(kw, beta=0.01), impl="triton")[0].item()
    grpo_loss(*args, **dict(kw, beta=torch.tensor(0.01, device="cuda")), impl="triton")
    before = n_compiled()
    for beta in (0.02, 0.07, torch.tensor(0.1, device="cuda"), 0.0):
        grpo_loss(*args, **dict(kw, beta=beta, eps_low=0.1 + beta * 0.1 if
                                isinstance(beta, float) else 0.3), impl="triton")
    assert n_compiled() == before


def test_fully_masked_batch_gives_zero_loss_and_grads():
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_T1_d80_V1000"])
    kw["mask"] = torch.zeros(targets.shape)
    for impl in IMPLS:
        loss, stats, grads = run(impl, hidden, weight, targets, adv, kw, torch.float32)
        assert loss.item() == 0.0 and stats["kl"].item() == 0.0
        assert torch.count_nonzero(grads["dH"]) == 0 and torch.count_nonzero(grads["dW"]) == 0


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_masked_targets_are_ignored(impl):
    """HF-style -100 labels at masked positions are never read."""
    hidden, weight, targets, adv, kw = make_case(CASES["bnpo_onpolicy_iw_token_adv"])
    a = run(impl, hidden, weight, targets, adv, kw, torch.float32)
    targets2 = torch.where(kw["mask"] == 0, -100, targets)
    b = run(impl, hidden, weight, targets2, adv, kw, torch.float32)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[2]["dW"], b[2]["dW"])


def test_module_matches_function():
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_offpolicy_kl_bias_temp"])
    module = GRPOLoss(beta=kw.pop("beta"), temperature=kw.pop("temperature"), impl="torch")
    loss_type = kw.pop("loss_type")
    assert mr1fast.LossOptions(**module.options).loss_type == loss_type
    a, _ = module(hidden.float(), weight.float(), targets, adv, **dict(kw, bias=kw["bias"].float()))
    b, _ = grpo_loss(hidden.float(), weight.float(), targets, adv, beta=module.beta,
                     temperature=module.temperature, impl="torch",
                     **dict(kw, bias=kw["bias"].float()))
    assert torch.equal(a, b)


def _valid():
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_T1_d80_V1000"])
    return dict(hidden=hidden.float(), weight=weight.float(), targets=targets, advantages=adv,
                ref_logp=kw["ref_logp"], beta=0.04)


@pytest.mark.parametrize("name,change,match", [
    ("targets shape", lambda a: a.update(targets=a["targets"][:, :0]), "targets"),
    ("float targets", lambda a: a.update(targets=a["targets"].float()), "targets"),
    ("ids >= V", lambda a: a.update(targets=a["targets"] + 1000), "targets"),
    ("negative ids", lambda a: a.update(targets=a["targets"] - 1000), "targets"),
    ("NaN hidden", lambda a: a["hidden"].view(-1)[3].fill_(float("nan")), "hidden"),
    ("weight d", lambda a: a.update(weight=a["weight"][:, :5]), "weight"),
    ("weight dtype", lambda a: a.update(weight=a["weight"].double()), "weight"),
    ("advantages shape", lambda a: a.update(advantages=torch.zeros(7)), "advantages"),
    ("group_size does not divide B",
     lambda a: a.update(advantages=None, rewards=torch.ones(3), group_size=2), "group_size"),
    ("group_size < 2",
     lambda a: a.update(advantages=None, rewards=torch.ones(3), group_size=1), "group_size"),
    ("both advantages and rewards", lambda a: a.update(rewards=torch.ones(3), group_size=3),
     "rewards"),
    ("beta > 0 without ref", lambda a: a.pop("ref_logp"), "ref_logp"),
    ("negative beta", lambda a: a.update(beta=-0.1), "beta"),
    ("loss type", lambda a: a.update(loss_type="ppo"), "loss_type"),
    ("temperature", lambda a: a.update(temperature=0.0), "temperature"),
    ("eps_low", lambda a: a.update(eps_low=1.5), "eps_low"),
    ("old_logp shape", lambda a: a.update(old_logp=torch.zeros(2, 2)), "old_logp"),
    ("NaN ref_logp", lambda a: a["ref_logp"].view(-1)[0].fill_(float("nan")), "ref_logp"),
    ("mask shape", lambda a: a.update(mask=torch.ones(5)), "mask"),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=torch.tensor([0, 2])), "cu_seqlens|hidden"),
    ("impl", lambda a: a.update(impl="cuda"), "impl"),
    ("NaN weight", lambda a: a["weight"].view(-1)[5].fill_(float("nan")), "weight"),
    ("NaN beta tensor", lambda a: a.update(beta=torch.tensor(float("nan"))), "beta"),
    ("negative beta tensor", lambda a: a.update(beta=torch.tensor(-0.1)), "beta"),
    ("negative importance weights",
     lambda a: a.update(importance_weights=-torch.ones_like(a["ref_logp"])),
     "importance_weights"),
    ("zero num_items_in_batch tensor",
     lambda a: a.update(num_items_in_batch=torch.tensor(0.0), loss_type="dapo"),
     "num_items_in_batch"),
    ("infinite num_items_in_batch",
     lambda a: a.update(num_items_in_batch=float("inf"), loss_type="dapo"), "num_items_in_batch"),
])
def test_bad_input_raises_value_error_naming_argument(name, change, match):
    args = _valid()
    change(args)
    with pytest.raises(ValueError, match=match):
        grpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"),
                  args.pop("advantages", None), **args)


def test_unavailable_impl_raises():
    h, w, y, adv, kw = make_case(CASES["grpo_T1_d80_V1000"])
    with pytest.raises(RuntimeError, match="triton"):
        grpo_loss(h, w, y, adv, ref_logp=kw["ref_logp"], impl="triton")  # fp64: no kernel


def test_auto_picks_torch_on_cpu():
    from mr1fast.loss import resolve_impl
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    assert mr1fast.grpo_loss is grpo_loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_checks_off_gives_the_same_results(case, impl):
    """check_values=False computes the masked tokens too (at weight 0) instead of dropping
    them: the loss, gradients and stats are those of the checked path."""
    hidden, weight, targets, adv, kw = make_case(CASES[case])
    entropy = CASES[case].get("entropy", False)
    want = run(impl, hidden, weight, targets, adv, kw, torch.float32, entropy=entropy)
    got = run(impl, hidden, weight, targets, adv, dict(kw, check_values=False), torch.float32,
              entropy=entropy)
    atol, rtol = 1e-6, 1e-5
    assert_close("loss", got[0], want[0], atol, rtol)
    for k in want[2]:
        assert_close(k, got[2][k], want[2][k], atol, rtol)
    for k in want[1]:
        assert_close(k, got[1][k], want[1][k], atol, rtol)


@pytest.mark.parametrize("impl", IMPLS)
def test_checks_off_ignores_garbage_at_masked_tokens(impl):
    """Unchecked, the masked tokens reach the kernels: their -100 targets, NaN old log-probs
    and reference log-probs far enough to overflow exp() must still contribute exactly 0."""
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_offpolicy_kl_bias_temp"])
    want = run(impl, hidden, weight, targets, adv, kw, torch.float32)
    dead = kw["mask"] == 0
    bad = dict(kw, check_values=False,
               old_logp=torch.where(dead, float("nan"), kw["old_logp"]),
               ref_logp=torch.where(dead, 200.0, kw["ref_logp"]))
    got = run(impl, hidden, weight, torch.where(dead, -100, targets), adv, bad, torch.float32)
    assert torch.isfinite(got[0])
    assert_close("loss", got[0], want[0], 1e-6, 1e-5)
    for k in want[2]:
        assert_close(k, got[2][k], want[2][k], 1e-6, 1e-5)
    assert (got[1]["logp"][dead] == 0).all()


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batch_weights_add_up_to_the_whole_batch(loss_type):
    """sum over micro-batches of micro_batch_weight * grpo_loss(micro) == grpo_loss(batch), in
    the loss and in the gradients, for every loss type (uneven micro-batches, a fully masked
    sequence)."""
    from mr1fast.loss import micro_batch_weight
    c = dict(CASES["grpo_offpolicy_kl_bias_temp"], B=7, loss_type=loss_type)
    hidden, weight, targets, adv, kw = make_case(c)
    kw["max_completion_length"] = 6
    want = run("torch", hidden, weight, targets, adv, kw, torch.float64)
    w = weight.detach().clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 3), slice(3, 6), slice(6, 7)):
        part = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                for k, v in kw.items()}
        loss, _ = grpo_loss(hidden[rows], w, targets[rows], adv[rows], impl="torch", **part)
        loss = loss * micro_batch_weight(loss_type, kw["mask"][rows],
                                         total_sequences=kw["mask"].shape[0],
                                         total_tokens=kw["mask"].sum())
        loss.backward()
        total = total + loss.detach()
    # The weights are fp32 (the trainer's masks are): fp32 rounding, not fp64.
    assert_close("loss", total, want[0], 1e-9, 1e-6)
    assert_close("dW", w.grad, want[2]["dW"], 1e-9, 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["no sequences", "no tokens"])
def test_an_empty_batch_gives_a_zero_loss_with_zero_gradients(impl, shape):
    B, T = shape
    h = torch.randn(B, T, 16, requires_grad=True)
    w = torch.randn(33, 16, requires_grad=True)
    loss, stats = grpo_loss(h, w, torch.zeros(B, T, dtype=torch.long), torch.zeros(B),
                            impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and stats["kl"].item() == 0.0
    assert stats["logp"].shape == (B, T)
    assert torch.count_nonzero(w.grad) == 0


# The torch impl's closed-form d loss / d logp (chunked.clipped_objective_grads) against the
# specification's autograd, per option it covers, through clipping, both log-ratio clamps,
# masked tokens and ties at the clip bounds (on-policy ratios are exactly 1).
CLOSED_FORM_CASES = [
    dict(), dict(loss_type="bnpo"), dict(loss_type="dr_grpo"), dict(loss_type="dapo"),
    dict(loss_type="luspo"), dict(kl_estimator="k1"), dict(kl_estimator="k2"),
    dict(eps_low=0.1, eps_high=0.3), dict(log_ratio_clamp=0.5), dict(on_policy=True),
    dict(no_ref=True), dict(importance_weights="token"), dict(importance_weights="seq"),
    dict(no_mask=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", CLOSED_FORM_CASES, ids=lambda c: "-".join(
    f"{k}={v}" for k, v in c.items()) or "default")
def test_closed_form_objective_matches_autograd(c, dtype):
    from mr1fast.loss.chunked import clipped_objective_grads, closed_form
    from mr1fast.loss.inputs import prepare_batch
    from mr1fast.loss.options import LossOptions
    from mr1fast.loss.reference import KernelTokens, objective
    c = dict(c)
    flags = {k: c.pop(k, False) for k in ("on_policy", "no_ref", "no_mask")}
    iw = c.pop("importance_weights", None)
    options = LossOptions(**c)
    assert closed_form(options)
    g = torch.Generator().manual_seed(3)
    B, T, d, V = 4, 24, 8, 16
    hidden = torch.randn(B, T, d, generator=g, dtype=dtype)
    weight = torch.randn(V, d, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    logp = torch.randn(B * T, generator=g, dtype=dtype) - 2.0
    # old: ratios inside and outside the clip, exact bounds, and beyond the log-ratio clamp
    old = (logp + torch.randn(B * T, generator=g, dtype=dtype) * 0.3).view(B, T)
    old.view(-1)[:4] = logp[:4] - torch.tensor([0.0, 1e-3, 30.0, -30.0], dtype=dtype)
    ref = (logp + torch.randn(B * T, generator=g, dtype=dtype) * 0.5).view(B, T)
    ref.view(-1)[4:6] = logp[4:6] + torch.tensor([40.0, -40.0], dtype=dtype)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(dtype)
    weights = {None: None, "token": torch.rand(B, T, generator=g, dtype=dtype) + 0.5,
               "seq": torch.rand(B, generator=g, dtype=dtype) + 0.5}[iw]
    batch = prepare_batch(hidden, weight, targets, torch.randn(B, generator=g, dtype=dtype),
                          mask=None if flags["no_mask"] else mask,
                          old_logp=None if flags["on_policy"] else old,
                          ref_logp=None if flags["no_ref"] else ref, importance_weights=weights,
                          beta=0.0 if flags["no_ref"] else 0.07, options=options,
                          max_completion_length=T,
                          check_values=False)
    kt = KernelTokens(batch)
    for sl in (slice(None), slice(5, 61)):       # the whole batch, and a chunk of it
        x = logp[sl].clone().requires_grad_()
        want_loss, want_parts = objective(batch, kt[sl], x, None)
        want_g, = torch.autograd.grad(want_loss, x)
        loss, parts, got_g = clipped_objective_grads(batch, kt[sl], logp[sl])
        tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                                atol=1e-14)
        torch.testing.assert_close(loss, want_loss.detach(), **tol)
        torch.testing.assert_close(got_g, want_g, **tol)
        for k in ("kl", "low", "high"):
            torch.testing.assert_close(parts[k], want_parts[k], **tol)
        assert parts["phi"] is None and want_parts["phi"] is None


@pytest.mark.parametrize("c", [dict(delta=1.5), dict(dual_clip=3.0), dict(entropy_coef=0.01),
                               dict(use_bias_correction_kl=True), dict(loss_type="cispo"),
                               dict(loss_type="sapo"), dict(importance_sampling_level="sequence"),
                               dict(top_entropy_quantile=0.5)])
def test_options_outside_the_closed_form_keep_autograd(c):
    from mr1fast.loss.chunked import closed_form
    from mr1fast.loss.options import LossOptions
    assert not closed_form(LossOptions(**c))
