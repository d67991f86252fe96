"""Shared test helpers: tolerances (one table), verbose comparisons, the tiny model set-up."""
import torch

# (atol, rtol) of an implementation against the fp64 reference, by input dtype. For half
# dtypes the tests also require: error <= torch's own error in that dtype (naive) + margin.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 5e-2),
}
HALF_MARGIN = 1.5  # half-dtype error may be at most this multiple of naive's (plus atol/10)


def max_err(got, want):
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


def assert_close(name, got, want, atol, rtol):
    """Element-wise |got - want| <= atol + rtol * |want|, with a report that names the worst."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.double(), want.double()
    assert not torch.isnan(g).any(), f"{name}: NaN in result"
    bad = (g - w).abs() > atol + rtol * w.abs()
    if bad.any():
        i = ((g - w).abs() - rtol * w.abs()).argmax()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"(atol={atol}, rtol={rtol}); worst at flat index {int(i)}: got "
            f"{g.reshape(-1)[i].item():.6g}, want {w.reshape(-1)[i].item():.6g}")


def assert_no_worse_than_torch(name, got, torch_got, want, dtype):
    """Half dtypes: error vs the fp64 truth within TOLERANCES' atol (scaled by the magnitude) and
    at most HALF_MARGIN x torch's own error in that dtype, plus atol / 10."""
    err, torch_err = max_err(got, want), max_err(torch_got, want)
    bound = TOLERANCES[dtype][0] * max(1.0, want.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"
    assert err <= HALF_MARGIN * torch_err + bound / 10, \
        f"{name}: error {err:.3g} worse than torch's {dtype} error {torch_err:.3g}"


def tiny_policy_and_prompts(model_dir, n: int, seed: int):
    """The tiny model (fp32, CPU, seed 0), its prompt encoder and `n` encoded counting
    prompts (make_counting rows of `seed`)."""
    from mr1fast.trainer.data import make_counting, question
    from mr1fast.trainer.model import PromptEncoder, load_model

    torch.manual_seed(0)
    model = load_model(str(model_dir), device=torch.device("cpu"), dtype=torch.float32)
    encoder = PromptEncoder(str(model_dir))
    rows = make_counting(n, seed=seed)
    prompts = encoder.encode([r["image"] for r in rows], [question(r["problem"]) for r in rows],
                             torch.device("cpu"))
    return model, encoder, prompts



def read_step_checkpoint(ckpt, tmp_path):
    """A step checkpoint's DCP weights as one plain dict: {"model": {name: tensor},
    "optim": {name: {"exp_avg", "exp_avg_sq", "step"}}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt / "weights", out)
    return torch.load(out, weights_only=True)
