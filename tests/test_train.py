"""Training on one CPU process: config loading, the objective, EMA, checkpoints, bit-exact resume after SIGKILL,
NaN handling, gradient accumulation, latent caches, export and user errors. Tiny preset, 64 px images."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ldm
from ldm.training import train as T
from ldm.training.ema import EMA

from test_train_data import write_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe badly; see the subprocess env below too
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def config(tmp_path: Path, **overrides) -> dict:
    """A tiny run: 12 coloured squares at 64 px (8x8 latents), global batch 4, checkpoint every 2 steps."""
    data = tmp_path / "data"
    if not data.exists():
        write_folder(data, 12, sizes=((64, 64), (80, 64), (64, 96)))
    base = {"run_dir": str(tmp_path / "run"), "seed": 0, "model": {"preset": "tiny"},
            "data": {"path": str(data), "resolution": 64},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3},
            "checkpoint": {"every": 2, "keep": 2}, "log": {"progress_bar": False}}
    return T.load_train_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()], base=base)


def losses(run_dir: Path) -> list[str]:
    """The loss column of metrics.jsonl as text, so that comparisons are bit for bit."""
    return [line.split('"loss": ')[1].split(",")[0] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run_a: Path, run_b: Path, step: int, lr: float) -> None:
    """Two runs that saw the same samples with the same noise, computed in a different float32 order (batch split,
    ranks, accumulation). Justification of the tolerances:
    - losses and global gradient norms: only the summation order differs, so they agree to ~1e-7 relative; 1e-5
      leaves margin. The gradient norm catches loss-normalisation mistakes that AdamW would hide (it is invariant
      to the scale of the gradient).
    - the learning rates are computed from the step alone: exactly equal (no double scheduler stepping).
    - weights: AdamW divides each gradient by its own running RMS, so a coordinate whose gradient is at the
      round-off level may take a different step of up to ~lr; no bound much below lr can hold for every weight
      (on an AMD Zen 4 CPU ~20 of the tiny UNet's 985k weights differ by 0.01-0.14 lr after 3 steps).
      We require every difference below lr, at most 1e-4 of the weights beyond 0.01 lr and 99.9% within 1e-3 lr,
      whereas a real mistake (a dropped or doubled gradient, another sample order) moves nearly every weight by
      ~lr."""
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (run_a, run_b)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == list(range(1, step + 1))
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in rows[1]] == pytest.approx([r[key] for r in rows[0]], rel=1e-5)
    assert [r["lr"] for r in rows[0]] == [r["lr"] for r in rows[1]]
    for name in ("weights.safetensors", "ema.safetensors"):
        wa, wb = (load_file(str(r / "checkpoints" / f"step-{step}" / name)) for r in (run_a, run_b))
        diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
        assert diff.max().item() < lr, (name, diff.max().item())
        assert (diff > 0.01 * lr).sum().item() <= 1e-4 * diff.numel(), (name, (diff > 0.01 * lr).sum().item())
        assert diff.kthvalue(int(0.999 * diff.numel())).values.item() < 1e-3 * lr


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ldm.training.train", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


# --- configuration -------------------------------------------------------------------------------------------------

def test_config_yaml_overrides_and_typed_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\nmodel: {preset: tiny}\ndata: {path: d}\ntrain: {lr: 1e-4}\n")
    cfg = T.load_train_config(path, ["train.batch_size=2", "validation.prompts=[a, b]", "ema.enabled=false"])
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 2 and cfg.validation.prompts == ("a", "b")
    assert not cfg.ema.enabled and cfg.data.caption_dropout == 0.1
    for bad, match in [("train.lr_rate=1", "unknown key"), ("train.batch_size=two", "expected int"),
                       ("train.mixed_precision=fp8", "must be one of"), ("train", "key=value")]:
        with pytest.raises(ValueError, match=match):
            T.load_train_config(path, [bad])
    for name in ("tiny-shapes.yaml", "sd15-finetune.yaml"):  # the shipped configs parse
        T.load_train_config(ROOT / "configs" / "train" / name)


def test_one_builder_checks_model_and_training_sections():
    """ldm.config.build reads the model configs and the training config alike: the same errors, naming the key."""
    from ldm.config import UNetConfig, build
    from ldm.training.config import OptimConfig

    assert build(UNetConfig, {"channel_mult": [1, 2]}, "unet").channel_mult == (1, 2)
    assert build(OptimConfig, {"adam_betas": [0.9, 0.99]}, "train").adam_betas == (0.9, 0.99)
    for cls, where, values, match in [
            (UNetConfig, "unet", {"channel_mul": [1, 2]}, r"unknown key\(s\) \['unet.channel_mul'\] \(did you mean "
                                                          r"'unet.channel_mult'\?\); valid keys of 'unet': \["),
            (OptimConfig, "train", {"batch_sise": 2}, r"unknown key\(s\) \['train.batch_sise'\] \(did you mean "
                                                      r"'train.batch_size'\?\); valid keys of 'train': \["),
            (UNetConfig, "unet", {"model_channels": "32"}, r"^unet.model_channels: expected int, got '32'$"),
            (OptimConfig, "train", {"batch_size": "two"}, r"^train.batch_size: expected int, got 'two'$"),
            (UNetConfig, "unet", {"num_heads": 1.5}, r"^unet.num_heads: expected int or None, got 1.5$"),
            (OptimConfig, "train", {"max_grad_norm": "x"}, r"^train.max_grad_norm: expected float or None, got 'x'$")]:
        with pytest.raises(ValueError, match=match):
            build(cls, values, where)
    # and through the two loaders, whose sections are one level down
    with pytest.raises(ValueError, match=r"unet.model_channels: expected int, got '32'"):
        ldm.ModelConfig.from_dict({**ldm.preset("tiny").to_dict(), "unet": {"model_channels": "32"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['unet.channel_mul'\]"):
        ldm.ModelConfig.from_dict({"name": "x", "unet": {"channel_mul": [1, 2]}})


# --- objective, noise, schedule, EMA -------------------------------------------------------------------------------

def test_eps_and_v_targets_and_min_snr_weights():
    sd = ldm.StableDiffusion(ldm.preset("tiny"))
    a, s = sd.sqrt_alphas_cumprod, sd.sqrt_one_minus_alphas_cumprod
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    ctx = torch.zeros(3, 77, 32)
    av, sv = a[t].view(-1, 1, 1, 1), s[t].view(-1, 1, 1, 1)
    oracle_eps = lambda x_t, t_, c: (x_t - av * x0) / sv  # noqa: E731 - a UNet that knows the answer
    oracle_v = lambda x_t, t_, c: av * noise - sv * x0  # noqa: E731
    assert T.diffusion_loss(oracle_eps, x0, noise, t, ctx, a, s, "eps", None).max() < 1e-8
    assert T.diffusion_loss(oracle_v, x0, noise, t, ctx, a, s, "v", None).max() < 1e-10
    zero = lambda x_t, t_, c: torch.zeros_like(x_t)  # noqa: E731
    plain = T.diffusion_loss(zero, x0, noise, t, ctx, a, s, "eps", None)
    snr = (a[t] / s[t]) ** 2
    assert torch.allclose(T.diffusion_loss(zero, x0, noise, t, ctx, a, s, "eps", 5.0), plain * snr.clamp(max=5) / snr)
    plain_v = T.diffusion_loss(zero, x0, noise, t, ctx, a, s, "v", None)
    assert torch.allclose(T.diffusion_loss(zero, x0, noise, t, ctx, a, s, "v", 5.0),
                          plain_v * snr.clamp(max=5) / (snr + 1))


def test_noise_depends_on_the_sample_seed_alone():
    seeds = torch.tensor([11, 22, 33])
    d, t, n, vn = T.draw_sample_noise(seeds, (4, 8, 8), 1000, 0.5, 0.0)
    d1, t1, n1, vn1 = T.draw_sample_noise(seeds[1:2], (4, 8, 8), 1000, 0.5, 0.0)
    assert d[1] == d1[0] and t[1] == t1[0] and torch.equal(n[1], n1[0]) and torch.equal(vn[1], vn1[0])
    _, _, offset, _ = T.draw_sample_noise(seeds, (4, 8, 8), 1000, 0.5, 0.1)
    diff = offset - n  # the noise offset is one constant per channel
    assert torch.allclose(diff, diff.mean(dim=(2, 3), keepdim=True), atol=1e-6) and diff.abs().max() > 0
    dropped = T.draw_sample_noise(torch.arange(2000), (1, 1, 1), 1000, 0.1, 0.0)[0]
    assert 0.08 < dropped.float().mean() < 0.12  # caption dropout at its rate


def test_lr_schedule_warmup_then_cosine_or_constant():
    f = T.LRLambda(warmup=4, total=14, kind="cosine")
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert T.LRLambda(2, 10, "constant")(7) == 1.0


def test_ema_decay_warmup_and_swap():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update nearly copies
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start["weight"] + 0.9) and ema.num_updates == 1
    raw = model.weight.detach().clone()
    with ema.swapped_into(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, raw)


# --- full runs -----------------------------------------------------------------------------------------------------

def test_train_checkpoints_validation_and_export(tmp_path):
    cfg = config(tmp_path, **{"checkpoint.keep": 1, "validation.every": 2, "validation.steps": 2,
                              "validation.prompts": ["a red square", "a blue square"], "validation.seeds": [0, 1]})
    last = T.train(cfg)
    run = Path(cfg.run_dir)
    assert last == run / "checkpoints" / "step-4"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]  # keep: 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "it_s", "images_s", "skipped_images"} <= set(rows[0])
    pytest.importorskip("ldm.generation.pipeline")
    from PIL import Image

    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    assert Image.open(run / "samples" / "step-4.png").size == (128, 128)  # 2 prompts x 2 seeds of 64 px

    from ldm.training.export import main as export_main

    assert export_main([str(run), "--ema"]) == 0
    sd = ldm.load(run / "export" / "step-4-ema.safetensors")
    ema = load_file(str(last / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in sd.state_dict().items() if k in ema)
    frozen = load_file(str(run / "frozen.safetensors"))
    assert all(torch.equal(v, frozen[k]) for k, v in sd.state_dict().items() if k.startswith("first_stage_model."))
    assert export_main([str(run), "--ema"]) == 2                   # exists: a one-line error, exit 2
    assert export_main([str(tmp_path / "nothing")]) == 2


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    data = write_folder(tmp_path / "data", 12, sizes=((64, 64), (80, 64)))
    cfg_path.write_text(f"run_dir: {tmp_path / 'a'}\nmodel: {{preset: tiny}}\ndata: {{path: {data}, resolution: 64, "
                        "random_flip: true, center_crop: false}\ntrain: {max_steps: 6, batch_size: 2, grad_accum: 2, "
                        "lr: 1e-3, warmup_steps: 2}\ncheckpoint: {every: 2, keep: 5}\nlog: {progress_bar: false}\n")
    whole = run_cli(str(cfg_path))
    assert whole.returncode == 0, whole.stderr
    killed = run_cli(str(cfg_path), f"run_dir={tmp_path / 'b'}", env={T.DEBUG_KILL_ENV: "5"})
    assert killed.returncode == -9  # SIGKILL in the middle of step 5, between two micro-batches
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    resumed = run_cli(str(cfg_path), f"run_dir={tmp_path / 'b'}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 6
    for name in ("weights.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / r / "checkpoints" / "step-6" / name)) for r in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = T.diffusion_loss
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(T, "diffusion_loss", exploding)
    cfg = config(tmp_path)
    with pytest.raises(T.TrainingDiverged, match=r"step 3: the loss is nan.*step-2"):
        T.train(cfg)
    run = Path(cfg.run_dir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_gradient_accumulation_steps_once_per_optimizer_step(tmp_path):
    a = T.train(config(tmp_path / "a", **{"train.max_steps": 3}))
    b = T.train(config(tmp_path / "b", **{"train.max_steps": 3, "train.batch_size": 2, "train.grad_accum": 2}))
    state_a, state_b = (json.loads((p / "train_state.json").read_text()) for p in (a, b))
    assert state_a["ema_updates"] == state_b["ema_updates"] == 3  # once per optimizer step, not per micro-batch
    opt = torch.load(b / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {3.0}
    assert_same_training(a.parents[1], b.parents[1], step=3, lr=1e-3)  # same samples, same gradient


def test_latent_cache_trains_without_the_vae(tmp_path, monkeypatch):
    from ldm.training.latents_cache import cache_latents
    from ldm.models.vae import AutoencoderKL

    cfg = config(tmp_path, **{"data.random_flip": True})
    cache = cache_latents(cfg, tmp_path / "cache", text=True, batch_size=4, shard_size=5)
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["count"] == 12 and meta["flip"] and meta["text"] and len(list(cache.glob("latents-*"))) == 3
    monkeypatch.setattr(AutoencoderKL, "encode", lambda *a, **k: pytest.fail("the VAE encoder ran"))
    cached = config(tmp_path, **{"data.path": None, "data.cache": str(cache), "data.random_flip": True,
                                 "run_dir": str(tmp_path / "run-cached"), "train.max_steps": 2})
    T.train(cached)
    assert len(losses(tmp_path / "run-cached")) == 2
    other = config(tmp_path, **{"data.path": None, "data.cache": str(cache), "seed": 1, "train.max_steps": 1,
                                "run_dir": str(tmp_path / "run-other")})
    with pytest.raises(ValueError, match="different VAE"):  # seed 1 builds another random tiny VAE
        T.train(other)


def test_fine_tune_a_checkpoint_with_v_prediction_text_encoder_and_bf16(tmp_path):
    torch.manual_seed(0)
    base = ldm.save(ldm.StableDiffusion(ldm.preset("tiny")), tmp_path / "base.safetensors")
    cfg = config(tmp_path, **{"model.preset": None, "model.checkpoint": str(base), "model.prediction": "v",
                              "model.train_text_encoder": True, "model.gradient_checkpointing": True,
                              "train.min_snr_gamma": 5.0, "train.noise_offset": 0.05, "train.max_steps": 2,
                              "train.mixed_precision": "bf16", "data.bucketing": True, "data.bucket_step": 32,
                              "data.max_aspect": 3.0, "data.center_crop": False, "data.random_flip": True,
                              "ema.cpu": True})
    last = T.train(cfg)
    assert len(losses(Path(cfg.run_dir))) == 2
    from ldm.training.export import export

    sd = ldm.load(export(cfg.run_dir, ema=False))
    before = ldm.load(base)
    assert sd.prediction == "v"
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    vae = "first_stage_model.decoder.conv_out.weight"
    assert not torch.equal(sd.state_dict()[te], before.state_dict()[te])  # the text encoder was trained
    assert torch.equal(sd.state_dict()[vae], before.state_dict()[vae])    # the VAE stayed frozen
    assert (last / "weights.safetensors").exists()


@pytest.mark.parametrize("case", ["empty", "caption_column", "existing_run", "unknown_key", "fp16_cpu", "no_model"])
def test_user_mistakes_are_one_line_errors_with_exit_code_2(tmp_path, capsys, case):
    data = write_folder(tmp_path / "data", 4, metadata=True)
    (tmp_path / "empty").mkdir()
    args = {"empty": [f"data.path={tmp_path / 'empty'}"], "caption_column": ["data.caption_column=caption"],
            "existing_run": [], "unknown_key": ["train.learning_rate=1"], "fp16_cpu": ["train.mixed_precision=fp16"],
            "no_model": ["model.preset=null"]}[case]
    if case == "existing_run":
        (tmp_path / "run" / "checkpoints" / "step-2").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / "step-2" / "train_state.json").write_text("{}")
    if case == "fp16_cpu" and torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {{preset: tiny}}\n"
                        f"data: {{path: {data}, resolution: 64}}\n")
    assert T.main([str(cfg_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm train: error: ") and "\n" not in err and "Traceback" not in err


def test_streamed_shards_train_and_resume_bit_exactly(tmp_path):
    from test_train_data import write_shards

    write_shards(tmp_path / "tars", [5, 6, 4])
    common = {"data.path": None, "data.shards": str(tmp_path / "tars"), "data.num_workers": 2,
              "data.shuffle_buffer": 3, "train.batch_size": 2, "train.lr_schedule": "constant", "train.max_steps": 12}
    T.train(config(tmp_path, **common, run_dir=str(tmp_path / "a")))
    T.train(config(tmp_path, **{**common, "train.max_steps": 5}, run_dir=str(tmp_path / "b")))  # stops mid-epoch
    T.train(config(tmp_path, **common, run_dir=str(tmp_path / "b"), resume="latest"))
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 12
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0] == 0 and epochs[-1] >= 1  # 15 samples in batches of 2: several epochs


def test_subcommands_plug_into_an_argparse_cli(tmp_path):
    import argparse

    from ldm.training import export, latents_cache

    parser = argparse.ArgumentParser(prog="ldm")
    sub = parser.add_subparsers(dest="command")
    for module in (T, latents_cache, export):
        module.add_subcommand(sub)
    cfg_path = tmp_path / "c.yaml"
    data = write_folder(tmp_path / "data", 4)
    cfg_path.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {{preset: tiny}}\n"
                        f"data: {{path: {data}, resolution: 64}}\n"
                        "train: {max_steps: 1, batch_size: 2}\nlog: {progress_bar: false}\n")
    for argv in (["cache-latents", str(cfg_path), "--out", str(tmp_path / "cache")],
                 ["train", str(cfg_path), "data.path=null", f"data.cache={tmp_path / 'cache'}"],
                 ["export", str(tmp_path / "run"), "--ema", "--dtype", "fp16"]):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    exported = load_file(str(tmp_path / "run" / "export" / "step-1-ema.safetensors"))
    assert exported["model.diffusion_model.time_embed.0.weight"].dtype == torch.float16


def test_stale_temporary_checkpoints_are_ignored_and_cleaned(tmp_path):
    cfg = config(tmp_path, **{"train.max_steps": 2})
    stale = Path(cfg.run_dir) / "checkpoints" / ".tmp-step-7"
    stale.mkdir(parents=True)  # a save that a crash interrupted: not a checkpoint
    assert T.find_checkpoint(Path(cfg.run_dir), "latest") is None
    T.train(cfg)
    assert sorted(p.name for p in stale.parent.iterdir()) == ["step-2"]
