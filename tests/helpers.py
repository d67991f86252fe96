"""Shared test helpers: tolerances (one table) and verbose comparisons."""
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
