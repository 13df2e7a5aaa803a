"""`kiln bench train`, `kiln bench speedrun` and `kiln profile` run end to end on the CPU (smoke size)."""

from __future__ import annotations

import json

import pytest

from kiln.cli.main import main


def test_bench_train_tiny_cpu(tmp_path):
    rc = main(["bench", "train", "--shapes", "tiny", "--variants", "torch,kiln,kiln+muon", "--steps", "2",
               "--warmup", "1", "--device", "cpu", "--compile", "off", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench_train.json").read_text())
    assert [r["variant"] for r in rows] == ["torch", "kiln", "kiln+muon"] and not any(r["error"] for r in rows)
    # Same shape, same data, same init scale: both start near ln(512) = 6.24 nats.
    assert all(5.5 < r["final_loss"] < 7.0 and r["tok_s"] > 0 for r in rows)
    assert "| tiny | kiln |" in (tmp_path / "bench_train.md").read_text()


def test_bench_speedrun_tiny_cpu(tokens_dir, tmp_path):
    shape = ["--set", "model.vocab_size=64", "--set", "model.context_length=16", "--set", "model.d_model=32",
             "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "batch_size=4", "--set", "warmup_steps=2"]
    rc = main(["bench", "speedrun", "--tokens", str(tokens_dir), "--preset", "tiny", *shape, "--seconds", "1",
               "--eval-batches", "2", "--device", "cpu", "--out", str(tmp_path / "sr")])
    assert rc == 0
    rows = json.loads((tmp_path / "sr" / "bench_speedrun.json").read_text())
    assert {r["side"] for r in rows} == {"torch", "kiln"}
    assert all(r["steps"] >= 1 and 0 < r["val_loss"] < 6 for r in rows)


def test_bench_speedrun_scores_the_same_heldout_tokens_for_every_batch_size(tokens_dir, tmp_path, capsys):
    """A batch-size ablation compares losses on one held-out set: --eval-tokens fixes it (the old
    --eval-batches scaled it with the batch, which confounded the comparison)."""
    shape = ["--set", "model.vocab_size=64", "--set", "model.context_length=16", "--set", "model.d_model=32",
             "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "warmup_steps=2"]
    said = []
    for batch in (2, 8):
        out = tmp_path / f"b{batch}"
        rc = main(["bench", "speedrun", "--tokens", str(tokens_dir), "--preset", "tiny", *shape, "--set",
                   f"batch_size={batch}", "--seconds", "0.3", "--eval-tokens", "100", "--device", "cpu",
                   "--sides", "kiln", "--out", str(out)])
        assert rc == 0
        said.append([line for line in (out / "bench_speedrun.md").read_text().splitlines() if "held-out" in line])
        assert json.loads((out / "kiln_seed1337" / "key.json").read_text())["val_tokens"] == 96  # 6 windows of 16
    assert said[0] == [s.replace("batch_size=8", "batch_size=2") for s in said[1]] and "val: 96 held-out tokens" in said[0][0]


def test_bench_speedrun_pauses_and_resumes_over_calls(tokens_dir, tmp_path, capsys):
    """A time limit shorter than the benchmark: each call pauses the run in progress (exit 75) and
    the same command continues it; finished rows are reused; the clock adds up across calls."""
    shape = ["--set", "model.vocab_size=64", "--set", "model.context_length=16", "--set", "model.d_model=32",
             "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "batch_size=4", "--set", "warmup_steps=2"]
    cmd = ["bench", "speedrun", "--tokens", str(tokens_dir), "--preset", "tiny", *shape, "--seconds", "0.6",
           "--eval-batches", "2", "--device", "cpu", "--sides", "kiln,torch", "--out", str(tmp_path / "sr"),
           "--time-limit", "0.4"]
    codes = []
    for _ in range(40):
        codes.append(main(cmd))
        if codes[-1] == 0:
            break
    out = capsys.readouterr().out
    assert codes[-1] == 0 and set(codes[:-1]) == {75} and len(codes) >= 3, codes
    assert "torch seed 1337: paused at step" in out and "torch seed 1337: resumed at step" in out
    assert "paused at step" in (tmp_path / "sr" / "kiln_seed1337" / "train.log").read_text()
    assert "kiln seed 1337: finished earlier" in out  # reused while the torch side went on
    rows = json.loads((tmp_path / "sr" / "bench_speedrun.json").read_text())
    assert [r["side"] for r in rows] == ["kiln", "torch"]
    # The budget held across the pauses (no upper bound on the clock: 2 shared cores stall at will;
    # the exit codes above show each call stopped at its limit)
    assert all(r["seconds"] >= 0.6 and r["steps"] >= 2 and 0 < r["val_loss"] < 6 for r in rows)
    assert main([*cmd[:-2]]) == 0  # everything finished: a call without a limit only reuses


def test_profile_tiny_cpu(tmp_path):
    rc = main(["profile", "--shape", "tiny", "--steps", "1", "--warmup", "1", "--batch", "2", "--device", "cpu",
               "--out", str(tmp_path / "prof")])
    assert rc == 0
    ops = (tmp_path / "prof" / "ops.md").read_text()
    assert "matmul" in ops and (tmp_path / "prof" / "trace.json").is_file()


def test_plain_baseline_is_the_same_model_as_kiln():
    """The baseline of `kiln bench train/speedrun` computes Kiln's function: same weights, same logits."""
    import torch

    from kiln.bench.baseline import PlainLlama
    from kiln.model import ModelConfig, build_model

    cfg = ModelConfig(vocab_size=97, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      tie_embeddings=True)
    torch.manual_seed(0)
    kiln = build_model(cfg)
    plain = PlainLlama(cfg)
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    with torch.no_grad():
        plain.embed.weight.copy_(kiln.embed_tokens.weight)
        plain.ln_f.copy_(torch.rand(cfg.d_model) + 0.5)
        kiln.norm.weight.copy_(plain.ln_f)
        for blk, layer in zip(plain.blocks, kiln.layers):
            for short, long in names.items():
                getattr(blk, short).weight.copy_(layer.get_submodule(long).weight)
            blk.ln1.copy_(torch.rand(cfg.d_model) + 0.5)
            blk.ln2.copy_(torch.rand(cfg.d_model) + 0.5)
            layer.input_layernorm.weight.copy_(blk.ln1)
            layer.post_attention_layernorm.weight.copy_(blk.ln2)
    x = torch.randint(0, cfg.vocab_size, (3, 16))
    torch.testing.assert_close(plain(x), kiln(x), rtol=1e-4, atol=1e-4)
    y = torch.randint(0, cfg.vocab_size, (3, 16))
    torch.testing.assert_close(plain(x, y), torch.nn.functional.cross_entropy(kiln(x).view(-1, 97), y.view(-1)))


def test_bench_speedrun_without_heldout_tokens_says_what_to_do(tokens_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare_tokens"
    shutil.copytree(tokens_dir, bare)
    for p in bare.glob("val_*.bin"):
        p.unlink()
    rc = main(["bench", "speedrun", "--tokens", str(bare), "--preset", "tiny", "--seconds", "1", "--device", "cpu",
               "--out", str(tmp_path / "sr")])
    err = capsys.readouterr().err
    assert rc == 2 and "no val_*.bin shards" in err and "validation split" in err
    rc = main(["bench", "speedrun", "--tokens", str(tokens_dir), "--preset", "tiny", "--seconds", "1",
               "--device", "cpu", "--eval-tokens", "0", "--out", str(tmp_path / "sr0")])
    assert rc == 2 and "--eval-tokens 0: must be a positive count" in capsys.readouterr().err


def test_speedrun_verdict_weighs_the_margin_against_seed_noise():
    from kiln.bench.speedrun import SpeedrunRow, compare_sides, format_table

    def row(side, seed, loss):
        return SpeedrunRow(side, seed, 600.0, 5000, 3.3e8, loss, None)

    # the fifth session's clean-split pair: lower for both seeds, margin 0.0101 vs spread 0.0097
    # (passes the spread rule by a hair; Welch t 2.1); a tie within noise; a loss; one run per side
    session = [row("kiln", 1337, 3.0463), row("torch", 1337, 3.0618), row("kiln", 1338, 3.0474), row("torch", 1338, 3.0521)]
    line = compare_sides(session)
    assert "+0.0101" in line and "noise (largest seed spread) 0.0097" in line and "+0.0155, +0.0047" in line
    assert "Welch t 2.1 (2 + 2 runs)" in line
    assert line.endswith("Kiln lower by more than the noise")  # 0.0101 > 0.0097, every seed lower
    noisy = [row("kiln", 1, 3.00), row("torch", 1, 3.05), row("kiln", 2, 3.04), row("torch", 2, 3.02)]
    assert compare_sides(noisy).endswith("not shown: the margin does not exceed the noise")
    worse = [row("kiln", 1, 3.10), row("torch", 1, 3.00), row("kiln", 2, 3.11), row("torch", 2, 3.01)]
    assert compare_sides(worse).endswith("Kiln not lower")
    assert "noise unknown" in compare_sides(session[:2])
    # one Kiln run against two baseline runs: still unknown, and the line says which side is short
    one_kiln = [r for r in session if r.side == "torch"] + [next(r for r in session if r.side == "kiln")]
    assert "noise unknown: kiln has 1 run(s), torch 2" in compare_sides(one_kiln)
    assert compare_sides([r for r in session if r.side == "kiln"]) is None
    assert "- margin (torch - kiln" in format_table(session)


def test_bench_optim_tiny_cpu(tmp_path):
    """Every optimizer row runs, and Kiln's Muon and AdamW make the same first update as torch.optim's
    (Muon: torch's Newton-Schulz always runs in bf16, Kiln's in fp32 on the CPU, hence ~1e-2)."""
    rc = main(["bench", "optim", "--shapes", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 0
    rows = {(r["table"], r["impl"]): r for r in json.loads((tmp_path / "bench_optim.json").read_text())}
    assert not any(r["error"] for r in rows.values())
    assert rows[("step", "kiln Muon eager")]["rel_diff"] < 5e-2
    assert rows[("step", "kiln Muon fused")]["rel_diff"] < 5e-2
    assert rows[("step", "kiln AdamW fused")]["rel_diff"] < 1e-5
    assert rows[("newton-schulz x5", "kiln batched baddbmm")]["rel_diff"] < 1e-5
    assert all(r["ms"] > 0 for r in rows.values())
    assert "| tiny | step | kiln Muon fused |" in (tmp_path / "bench_optim.md").read_text()
    assert main(["bench", "optim", "--shapes", "nope", "--device", "cpu"]) == 2


def test_bench_optim_says_when_a_fused_row_ran_the_fallback(tmp_path, monkeypatch):
    """A "fused" row timed on a device where the kernels cannot run must say it timed the eager path."""
    import kiln.kernels._backend as backend

    from kiln.kernels import KernelFallbackWarning

    monkeypatch.setattr(backend, "TRITON_INTERPRET", False)  # a plain CPU: no Triton kernels here
    with pytest.warns(KernelFallbackWarning, match="kiln.kernels.muon"):  # and the user is warned as well
        rc = main(["bench", "optim", "--shapes", "tiny", "--rows", "kiln Muon fused", "--steps", "1",
                   "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    (row,) = [r for r in json.loads((tmp_path / "bench_optim.json").read_text()) if r["table"] == "step"]
    assert row["note"].startswith("ran the eager fallback: tensors are on the CPU")
    assert "ran the eager fallback" in (tmp_path / "bench_optim.md").read_text()


def _finished_run(folder, side, seed, loss, cfg=None, overrides=(), val_tokens=758695, env=True):
    """A ``<side>_seed<seed>/row.json`` as ``kiln bench speedrun`` writes it (``cfg``: its recipe)."""
    from dataclasses import asdict

    from kiln.bench.speedrun import SpeedrunRow, recipe

    key = {"side": side, "seed": seed, "preset": "speedrun", "overrides": list(overrides), "seconds": 600.0,
           "val_tokens": val_tokens}
    if cfg is not None:
        key["recipe"] = recipe(cfg, side)
    saved = {"key": key, "row": asdict(SpeedrunRow(side, seed, 600.0, 5000, 3.3e8, loss, 1.2))}
    if env:
        saved["env"] = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "date": "2026-11-23"}
    (folder / f"{side}_seed{seed}").mkdir(parents=True)
    (folder / f"{side}_seed{seed}" / "row.json").write_text(json.dumps(saved))


def test_speedrun_report_joins_runs_from_several_folders_by_recipe(tmp_path, capsys):
    """Runs finished in separate folders (slots, machines) group by what they trained with, and
    every Kiln setting is weighed against every baseline setting with the seed noise."""
    import dataclasses

    from kiln.train import PRESETS

    base = PRESETS["speedrun"]()
    k04 = dataclasses.replace(base, muon_weight_decay=0.4)
    t04 = dataclasses.replace(base, weight_decay=0.4)
    _finished_run(tmp_path / "a", "kiln", 1337, 2.9653, k04, ["muon_weight_decay=0.4"])
    _finished_run(tmp_path / "b", "kiln", 1338, 2.9633, k04, ["muon_weight_decay=0.4", "seed=1338"])
    _finished_run(tmp_path / "c", "torch", 1337, 3.0618, base)
    _finished_run(tmp_path / "c", "torch", 1338, 3.0521, base)
    _finished_run(tmp_path / "d", "torch", 1337, 3.0193, t04, ["weight_decay=0.4"])
    _finished_run(tmp_path / "d", "torch", 1338, 3.0243, t04, ["weight_decay=0.4"])
    # The baseline's recipe ignores Kiln-only keys: a torch run under another Muon decay is the same setting.
    _finished_run(tmp_path / "e", "torch", 1339, 3.0580, dataclasses.replace(base, muon_weight_decay=0.1),
                  ["muon_weight_decay=0.1"])
    (tmp_path / "e" / "kiln_seed1339").mkdir()  # a paused run: key.json, no row.json yet
    (tmp_path / "e" / "kiln_seed1339" / "key.json").write_text("{}")
    rc = main(["bench", "speedrun-report", *(str(tmp_path / f) for f in "abcde"), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| kiln speedrun muon_weight_decay=0.4 | 2 | 2.9643 | 0.0020 |" in out
    assert "| torch speedrun | 3 |" in out  # seeds 1337-1339: folders c and e are one setting
    assert "| torch speedrun weight_decay=0.4 | 2 | 3.0218 | 0.0050 |" in out
    verdicts = [line for line in out.splitlines() if line.startswith("- **kiln")]
    assert len(verdicts) == 2 and all(v.endswith("Kiln lower by more than the noise") for v in verdicts)
    assert "+0.0575" in verdicts[1] and "NVIDIA H100 80GB HBM3, torch 2.11.0, 2026-11-23" in out
    assert "kiln_seed1339: not finished" in out
    assert (tmp_path / "rep" / "bench_speedrun_report.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((tmp_path / "rep" / "bench_speedrun_report.json").read_text())
    assert len(rows) == 7 and {r["setting"] for r in rows} == {
        "kiln speedrun muon_weight_decay=0.4", "torch speedrun", "torch speedrun weight_decay=0.4"}


def test_speedrun_report_tells_apart_one_name_with_two_recipes_and_takes_labels(tmp_path, capsys):
    """A preset whose values changed between runs gives one name two recipes: numbered, with the
    differing key named. Rows from before recipes were recorded can be joined by FOLDER=LABEL."""
    import dataclasses

    from kiln.train import PRESETS

    base = PRESETS["speedrun"]()
    _finished_run(tmp_path / "old", "kiln", 1337, 2.9653, dataclasses.replace(base, muon_weight_decay=0.4))
    _finished_run(tmp_path / "new", "kiln", 1337, 2.9190, dataclasses.replace(base, muon_weight_decay=0.8))
    assert main(["bench", "speedrun-report", str(tmp_path / "old"), str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "| kiln speedrun [recipe 1] | 1 | 2.9653 |" in out and "| kiln speedrun [recipe 2] | 1 | 2.9190 |" in out
    assert "names 2 different settings (numbered); they differ in: muon_weight_decay" in out
    # no recipe recorded (older rows): named "recipe unrecorded" unless labelled; a label joins folders
    _finished_run(tmp_path / "x", "kiln", 1337, 2.9653, None, ["muon_weight_decay=0.4"], env=False)
    _finished_run(tmp_path / "y", "kiln", 1338, 2.9633, None, ["seed=1338"], env=False)
    _finished_run(tmp_path / "z", "torch", 1337, 3.0618, None)
    _finished_run(tmp_path / "z", "torch", 1338, 3.0521, None)
    assert main(["bench", "speedrun-report", str(tmp_path / "x"), str(tmp_path / "y"), str(tmp_path / "z")]) == 0
    out = capsys.readouterr().out
    assert "| kiln speedrun muon_weight_decay=0.4 (recipe unrecorded) | 1 |" in out and "| unrecorded |" in out
    assert main(["bench", "speedrun-report", f"{tmp_path / 'x'}=wd 0.4", f"{tmp_path / 'y'}=wd 0.4",
                 f"{tmp_path / 'z'}=plain"]) == 0
    out = capsys.readouterr().out
    assert "| kiln wd 0.4 | 2 | 2.9643 | 0.0020 |" in out
    assert "- **kiln wd 0.4** vs **torch plain**: margin (torch - kiln, mean val loss): +0.092" in out


def test_speedrun_report_refuses_runs_scored_on_different_heldout_tokens(tmp_path, capsys):
    _finished_run(tmp_path / "a", "kiln", 1337, 2.96, val_tokens=758695)
    _finished_run(tmp_path / "b", "torch", 1337, 3.06, val_tokens=2097151)
    assert main(["bench", "speedrun-report", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "differ in val_tokens" in err and "kiln_seed1337: 758695" in err and "torch_seed1337: 2097151" in err
    (tmp_path / "empty" / ".replaced" / "kiln_seed1337").mkdir(parents=True)  # set aside: not a run folder
    assert main(["bench", "speedrun-report", str(tmp_path / "empty")]) == 2
    assert "no <side>_seed<seed> run folders" in capsys.readouterr().err
    assert main(["bench", "speedrun-report", str(tmp_path / "missing")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err


def test_speedrun_reuses_a_finished_row_only_for_the_same_recipe(tmp_path, capsys):
    """The run key holds the resolved recipe, so re-running a command after a preset's values
    changed trains again instead of reusing the old row under the new name."""
    import dataclasses

    from kiln.bench.speedrun import SpeedrunRow, _prepare_run_dir, recipe
    from kiln.train import PRESETS

    base = PRESETS["speedrun"]()
    key = {"side": "kiln", "seed": 1337, "preset": "speedrun", "overrides": [], "seconds": 600.0,
           "val_tokens": 100, "recipe": recipe(dataclasses.replace(base, muon_weight_decay=0.4), "kiln")}
    run_dir = tmp_path / "kiln_seed1337"
    run_dir.mkdir()
    (run_dir / "row.json").write_text(json.dumps({"key": key, "row": dataclasses.asdict(
        SpeedrunRow("kiln", 1337, 600.0, 10, 100, 2.9, None))}))
    assert _prepare_run_dir(run_dir, key).val_loss == 2.9  # same recipe: reused
    newer = {**key, "recipe": recipe(dataclasses.replace(base, muon_weight_decay=0.8), "kiln")}
    assert _prepare_run_dir(run_dir, newer) is None and not (run_dir / "row.json").exists()
    # the finished run is kept aside (not deleted), and the user is told what differed
    kept = json.loads((tmp_path / ".replaced" / "kiln_seed1337" / "row.json").read_text())
    assert kept["row"]["val_loss"] == 2.9 and "muon_weight_decay" in capsys.readouterr().out
    # the baseline's recipe holds only what the baseline reads
    assert recipe(dataclasses.replace(base, muon_weight_decay=0.8), "torch") == recipe(base, "torch")
    assert recipe(dataclasses.replace(base, weight_decay=0.4), "torch") != recipe(base, "torch")
    assert "muon_weight_decay" in recipe(base, "kiln") and "model.d_model" in recipe(base, "torch")
    assert "seed" not in recipe(base, "kiln") and "max_seconds" not in recipe(base, "kiln")


def test_speedrun_report_with_only_unfinished_runs_says_so(tmp_path, capsys):
    (tmp_path / "a" / "kiln_seed1337").mkdir(parents=True)
    (tmp_path / "a" / "kiln_seed1337" / "key.json").write_text("{}")
    (tmp_path / "a" / "torch_seed1337").mkdir()
    (tmp_path / "a" / "torch_seed1337" / "row.json").write_text("{not json")
    assert main(["bench", "speedrun-report", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "no finished runs" in err and "kiln_seed1337: not finished" in err and "row.json: unreadable" in err
