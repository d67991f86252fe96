from mr1fast.trainer.cli import main


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


def test_train_rejects_a_bad_override_with_a_clear_message(capsys):
    assert main(["train", "grpo.lrr=1e-5"]) == 2
    assert "unknown key grpo.lrr" in capsys.readouterr().err
    assert main(["sft", "--config", "missing.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_init_model_writes_a_checkpoint(tmp_path, capsys):
    assert main(["init-model", "--preset", "tiny", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_train_cli_end_to_end(tmp_path, cache_dir, capsys):
    """`mr1fast train` on the embedded default, shortened by overrides."""
    run = tmp_path / "run"
    code = main(["train", "--output-dir", str(run), f"cache_dir={cache_dir}", "seed=0", "sampler=hf",
                 "grpo.max_steps=2", "grpo.sft_warmup_steps=2", "grpo.prompts_per_step=2",
                 "grpo.num_generations=2", "data.synthetic_size=16", "eval.limit=4",
                 "eval.synthetic_size=4", "log.progress=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "eval after SFT warm-up: counting" in out and "eval after GRPO-D: counting" in out
    for name in ("config.yaml", "metrics.jsonl", "metrics.png", "eval.json"):
        assert (run / name).is_file(), name


def test_bench_passes_its_arguments_through(monkeypatch):
    """`mr1fast bench --compare -k x` reaches pytest with -k x (and the comparison runs after a
    passing suite); `bench step ...` reaches bench/step.py."""
    import mr1fast.trainer.cli as cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert main(["bench", "--compare", "-k", "fwd"]) == 0
    assert calls[0][-4:] == ["--benchmark-only", "-k", "fwd", "--save-results"]
    assert calls[1][-1].endswith(".json") and "compare.py" in calls[1][-2]
    calls.clear()
    assert main(["bench", "step", "--models", "tiny"]) == 0
    assert calls[0][1].endswith("step.py") and calls[0][2:] == ["--models", "tiny"]


def test_a_lost_peer_is_not_reported_as_a_bug_of_this_process(monkeypatch):
    """Under torchrun, a collective that fails because another process died ends this one
    with a short message pointing at that process's, not with "a bug in mr1fast"."""
    from mr1fast.trainer.cli import peer_failed

    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:14738")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not peer_failed(gone)  # one process: no peer to blame
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert peer_failed(gone)
    assert not peer_failed(RuntimeError("injected failure"))
    assert not peer_failed(ValueError("Connection closed by peer"))
