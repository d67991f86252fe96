from mr1fast.cli import main


def test_demo_learns(capsys):
    """The main job: a toy GRPO-D run whose reward rises (exit code 0 only if it does)."""
    assert main(["demo", "--steps", "12", "--impl", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("reward")


def _step0(out):
    line = out.splitlines()[2].split()
    return [float(x) for x in line[1:5]]  # reward, beta, kl, loss


def test_demo_triton_matches_torch(capsys):
    main(["demo", "--steps", "1", "--impl", "torch"])
    torch_out = capsys.readouterr().out
    main(["demo", "--steps", "1", "--impl", "triton"])
    triton_out = capsys.readouterr().out
    assert "impl=triton" in triton_out
    for a, b in zip(_step0(torch_out), _step0(triton_out)):
        assert abs(a - b) <= 1e-3, (torch_out, triton_out)
