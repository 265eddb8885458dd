"""Loading checkpoints: formats by magic bytes, strict key reports, refused pickles, VAE files, dtypes, the CLI.

Every failure must be one readable `CheckpointError` (or `ValueError`/`FileNotFoundError`) that names the file
and the problem, and no payload in a pickle may run.
"""
import dataclasses
import os
import pickle
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm
import ldm.models.checkpoint as ckpt
from ldm.models.checkpoint import POSITION_IDS_KEY, CheckpointError, ema_key, probe_v_prediction
from ldm.models.stable_diffusion import SCHEDULE_BUFFERS

ROOT = Path(__file__).resolve().parents[1]
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def tiny() -> ldm.StableDiffusion:
    torch.manual_seed(0)
    return ldm.StableDiffusion(ldm.preset("tiny"))


@pytest.fixture(scope="module")
def tiny_state(tiny) -> dict[str, torch.Tensor]:
    """The tiny model's state dict in the original layout, as plain contiguous tensors."""
    return {k: v.detach().clone().contiguous() for k, v in tiny.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    return ldm.save(tiny, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def assert_same_weights(model: ldm.StableDiffusion, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


def write_bare_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    """A safetensors file without ldm's config metadata, like the files people download."""
    save_file(state, str(path), metadata={"format": "pt"})
    return path


# --- files that are not checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors_is_a_clear_error(tiny_file, tmp_path, cut):
    data = tiny_file.read_bytes()
    path = tmp_path / f"cut-in-{cut}.safetensors"
    path.write_bytes(data[:200] if cut == "header" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt") as err:
        ldm.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_truncated_ckpt_is_a_clear_error(tiny_state, tmp_path, legacy):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": tiny_state}, full, _use_new_zipfile_serialization=not legacy)
    path = tmp_path / "cut.ckpt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint.*corrupt") as err:
        ldm.load(path, config="tiny")
    assert str(path) in str(err.value)


# Random bytes, but not starting like a pickle (0x80) or zip (PK), nor with a safetensors JSON header ('{' at 8).
RANDOM_BYTES = b"\x01" + random.Random(0).randbytes(7) + b"x" + random.Random(1).randbytes(4087)


@pytest.mark.parametrize("name,content", [("random.safetensors", RANDOM_BYTES), ("random.ckpt", RANDOM_BYTES),
                                          ("empty.safetensors", b""), ("lfs-pointer.ckpt", b"version https://git-lfs\n")],
                         ids=["random-bytes", "random-bytes-ckpt", "empty", "git-lfs-pointer"])
def test_not_a_checkpoint(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint") as err:
        ldm.load(path)
    assert str(path) in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        ldm.load(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        ldm.load(tmp_path)


# --- formats are chosen by magic bytes -------------------------------------------------------------------------

def test_safetensors_named_ckpt_loads(tiny_file, tiny_state, tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(tiny_file.read_bytes())
    assert_same_weights(ldm.load(path), tiny_state)


def test_torch_zip_named_safetensors_loads(tiny_state, tmp_path):
    path = tmp_path / "x.safetensors"
    torch.save(tiny_state, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert_same_weights(ldm.load(path, config="tiny"), tiny_state)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_training_ckpt_with_state_dict_and_global_step_loads(tiny_state, tmp_path, legacy):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_state, "global_step": 5, "epoch": 1}, path, _use_new_zipfile_serialization=not legacy)
    assert path.read_bytes()[:1] == (b"\x80" if legacy else b"P")
    assert_same_weights(ldm.load(path, config="tiny"), tiny_state)


def test_lightning_callback_state_in_ckpt_loads_as_an_inert_stub(tiny_state, tmp_path, monkeypatch):
    """The original SD .ckpt files pickle PyTorch Lightning's ModelCheckpoint; it must load without Lightning."""
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module_name):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module_name})
    sys.modules[module_name].ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.best_model_score = 0.5
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tiny_state, "callbacks": {ModelCheckpoint: callback}}, path)
    monkeypatch.undo()  # load with Lightning "uninstalled" again
    assert_same_weights(ldm.load(path, config="tiny"), tiny_state)


# --- EMA weights ---------------------------------------------------------------------------------------------------

def test_full_training_ckpt_ignores_ema_unless_asked(tiny_state, tmp_path):
    torch.manual_seed(1)
    ema = {ema_key(k): torch.randn_like(v) for k, v in tiny_state.items() if k.startswith("model.diffusion_model.")}
    ema["model_ema.num_updates"] = torch.tensor(100)
    assert ema_key(UNET_KEY) == "model_ema.diffusion_modelinput_blocks00weight"
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": {**tiny_state, **ema}, "global_step": 5}, path)

    assert_same_weights(ldm.load(path, config="tiny"), tiny_state)

    sd = ldm.load(path, config="tiny", use_ema=True)
    for key, value in sd.state_dict().items():
        expected = ema[ema_key(key)] if key.startswith("model.diffusion_model.") else tiny_state[key]
        assert torch.equal(value, expected), key


def test_use_ema_without_ema_weights_is_an_error(tiny_file):
    with pytest.raises(CheckpointError, match="no EMA weights"):
        ldm.load(tiny_file, use_ema=True)


# --- pickles that would run code ------------------------------------------------------------------------------------

class SystemPayload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class ExecPayload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip"])
def test_malicious_pickle_is_refused_and_never_runs(tiny_state, tmp_path, payload, container):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.ckpt"
    if container == "raw-pickle":  # (plain pickle stores tensors through a global of its own, so leave them out)
        path.write_bytes(pickle.dumps({"state_dict": {"evil": payload(sentinel)}, "global_step": 5}, protocol=2))
        assert path.read_bytes()[:1] == b"\x80"
    else:
        torch.save({"state_dict": {**tiny_state, "evil": payload(sentinel)}}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        ldm.load(path, config="tiny")
    message = str(err.value)
    assert str(path) in message and ("system" in message or "exec" in message)
    assert "weights_only" not in message and "safe_globals" not in message  # never advise the unsafe way out
    assert not sentinel.exists()


# --- strict key reports ----------------------------------------------------------------------------------------------

def test_missing_key_is_listed(tiny_state, tmp_path):
    state = {k: v for k, v in tiny_state.items() if k != UNET_KEY}
    with pytest.raises(CheckpointError, match="1 missing keys") as err:
        ldm.load(write_bare_safetensors(state, tmp_path / "m.safetensors"), config="tiny")
    assert UNET_KEY in str(err.value)


def test_misshaped_key_reports_both_shapes(tiny_state, tmp_path):
    state = dict(tiny_state)
    state[UNET_KEY] = torch.zeros(32, 4, 3, 1)
    with pytest.raises(CheckpointError, match="shape") as err:
        ldm.load(write_bare_safetensors(state, tmp_path / "m.safetensors"), config="tiny")
    assert f"{UNET_KEY}: checkpoint [32, 4, 3, 1], model [32, 4, 3, 3]" in str(err.value)


def test_unexpected_key_is_listed_and_ignored_prefixes_are_not(tiny_state, tmp_path):
    state = {**tiny_state, "model.diffusion_model.extra.weight": torch.zeros(2), "logvar": torch.zeros(1000),
             "model_ema.decay": torch.tensor(0.9999), "loss.discriminator.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="1 unexpected keys") as err:
        ldm.load(write_bare_safetensors(state, tmp_path / "m.safetensors"), config="tiny")
    assert "model.diffusion_model.extra.weight" in str(err.value)
    assert "logvar" not in str(err.value) and "model_ema" not in str(err.value)


def test_wrong_architecture_is_one_short_readable_error(tmp_path):
    torch.manual_seed(0)
    path = ldm.save(ldm.StableDiffusion(ldm.preset("tiny-v2")), tmp_path / "v2.safetensors")
    with pytest.raises(CheckpointError, match="does not fit the tiny model") as err:
        ldm.load(path, config="tiny")
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message and "... and " in message
    assert "Traceback" not in message
    assert len(message.splitlines()) <= 3 * 23  # title + at most 20 keys + "... and N more", per section


def test_unknown_architecture_without_metadata(tiny_state, tmp_path):
    no_text = {k: v for k, v in tiny_state.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="cannot tell the architecture.*config="):
        ldm.load(write_bare_safetensors(no_text, tmp_path / "unet-vae.safetensors"))
    # A non-standard model without metadata matches no full preset: the error says which and how to fix it.
    with pytest.raises(CheckpointError, match="does not match the sd-v1 architecture; pass config="):
        ldm.load(write_bare_safetensors(tiny_state, tmp_path / "bare.safetensors"))
    assert_same_weights(ldm.load(tmp_path / "bare.safetensors", config="tiny"), tiny_state)


def test_pruned_file_without_optional_buffers_loads(tiny_state, tmp_path):
    """Schedule buffers and position ids may be absent (pruned files) or stored as float (some fine-tunes)."""
    state = {k: v for k, v in tiny_state.items() if k not in SCHEDULE_BUFFERS}
    state[POSITION_IDS_KEY] = state[POSITION_IDS_KEY].float()
    sd = ldm.load(write_bare_safetensors(state, tmp_path / "pruned.safetensors"), config="tiny")
    assert_same_weights(sd, tiny_state)
    assert sd.state_dict()[POSITION_IDS_KEY].dtype == torch.int64


# --- separate VAE files ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vae_state() -> dict[str, torch.Tensor]:
    """VAE weights (without prefix) that differ from the tiny model's."""
    torch.manual_seed(2)
    return {k: v.contiguous() for k, v in ldm.StableDiffusion(ldm.preset("tiny")).vae.state_dict().items()}


@pytest.mark.parametrize("prefixed", [False, True])
def test_separate_vae_replaces_the_bundled_one(tiny_file, tiny_state, other_vae_state, tmp_path, prefixed):
    prefix = "first_stage_model." if prefixed else ""
    vae = {prefix + k: v for k, v in other_vae_state.items()}
    vae["loss.logvar"] = torch.zeros(())  # VAE training files carry the discriminator; it is ignored
    path = write_bare_safetensors(vae, tmp_path / "vae.safetensors")
    sd = ldm.load(tiny_file, vae=path)
    assert_same_weights(sd.vae, other_vae_state)
    unet = {k: v for k, v in tiny_state.items() if k.startswith("model.")}
    assert all(torch.equal(sd.state_dict()[k], v) for k, v in unet.items())


def test_vae_ckpt_file_loads(tiny_file, other_vae_state, tmp_path):
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": other_vae_state, "global_step": 840000}, path)
    assert_same_weights(ldm.load(tiny_file, vae=path).vae, other_vae_state)


def test_vae_file_without_decoder_is_an_error(tiny_file, other_vae_state, tmp_path):
    encoder_only = {k: v for k, v in other_vae_state.items() if not k.startswith("decoder.")}
    path = write_bare_safetensors(encoder_only, tmp_path / "enc.safetensors")
    with pytest.raises(CheckpointError, match="not a VAE"):
        ldm.load(tiny_file, vae=path)


def test_vae_of_another_shape_is_a_key_report(tiny_file, tmp_path):
    torch.manual_seed(0)
    cfg = ldm.preset("tiny")
    big = ldm.StableDiffusion(cfg.replace(vae=dataclasses.replace(cfg.vae, ch=32)))
    path = write_bare_safetensors({k: v.contiguous() for k, v in big.vae.state_dict().items()}, tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        ldm.load(tiny_file, vae=path)


# --- config and prediction -------------------------------------------------------------------------------------------

def test_config_as_name_object_and_yaml(tiny_state, tmp_path):
    path = write_bare_safetensors(tiny_state, tmp_path / "bare.safetensors")
    yaml_file = tmp_path / "my-tiny.yaml"
    yaml_file.write_text("preset: tiny\nprediction: v\n")
    for config in ("tiny", ldm.preset("tiny"), yaml_file, str(yaml_file)):
        sd = ldm.load(path, config=config)
        assert_same_weights(sd, tiny_state)
    assert sd.config.prediction == "v"


def test_config_yaml_errors_name_the_file_and_the_key(tmp_path):
    """A model YAML is checked by ldm.config.build, as the training config is: unknown keys and wrong types fail."""
    cases = [("unet: {channel_mul: [1, 2]}",
              r"unknown key\(s\) \['unet.channel_mul'\] \(did you mean 'unet.channel_mult'\?"),
             ("vae: {scale_factor: big}", r"vae.scale_factor: expected float, got 'big'"),
             ("text: {kind: t5}", r"text.kind must be one of \['hf-clip', 'open-clip'\], got 't5'"),
             ("unet: 4", r"config section 'unet' must be a mapping")]
    for body, match in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(f"preset: tiny\n{body}\n")
        with pytest.raises(ValueError, match=r"bad.yaml: " + match):
            ldm.load_config(path)
    path.write_text("preset: tiny\nunet: {channel_mult: [1, 2, 2]}\nguidance_interval: [1, null]\n")
    cfg = ldm.load_config(path)
    assert cfg.unet.channel_mult == (1, 2, 2) and cfg.guidance_interval == (1.0, None)


def test_unknown_preset_lists_the_presets(tiny_file):
    with pytest.raises(ValueError, match=r"unknown preset 'sd-v3'.*'sd-v1'.*'tiny'"):
        ldm.load(tiny_file, config="sd-v3")


def test_prediction_override(tiny_file):
    assert ldm.load(tiny_file).config.prediction == "eps"
    assert ldm.load(tiny_file, prediction="v").config.prediction == "v"
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        ldm.load(tiny_file, prediction="x")


@pytest.mark.parametrize("offset,is_v", [(-2.0, True), (0.0, False)])
def test_probe_v_prediction(monkeypatch, offset, is_v):
    """At t=999 an eps model returns about its input; a v model returns about -x0, far below it."""
    sd = ldm.StableDiffusion(ldm.preset("tiny-v2"))
    seen = {}

    def fake_unet(x, t, context):
        seen.update(t=t, context=context.shape)
        return x + offset

    monkeypatch.setattr(sd.model.diffusion_model, "forward", fake_unet)
    assert probe_v_prediction(sd) is is_v
    assert seen["t"].tolist() == [999] and seen["context"][-1] == sd.config.unet.context_dim


@pytest.mark.parametrize("is_v", [True, False])
def test_load_applies_the_probe_to_detected_sd2_files(tmp_path, monkeypatch, is_v):
    """Detection knows only the full presets, so stand a detected tiny-v2 in for SD 2 here."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in ldm.StableDiffusion(ldm.preset("tiny-v2")).state_dict().items()}
    path = write_bare_safetensors(state, tmp_path / "v2.safetensors")
    monkeypatch.setattr(ckpt, "detect_config", lambda shapes, metadata: ldm.preset("tiny-v2"))
    monkeypatch.setattr(ckpt, "probe_v_prediction", lambda model: is_v)
    assert ldm.load(path).config.prediction == ("v" if is_v else "eps")

    def no_probe(model):
        raise AssertionError("the probe must not run when prediction= is given")

    monkeypatch.setattr(ckpt, "probe_v_prediction", no_probe)
    assert ldm.load(path, prediction="eps").config.prediction == "eps"


# --- dtype and the meta-device build -------------------------------------------------------------------------------

def test_load_in_fp16_keeps_schedule_and_position_ids(tiny_file, tiny_state):
    sd = ldm.load(tiny_file, dtype=torch.float16)
    assert sd.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in sd.parameters())
    state = sd.state_dict()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], tiny_state[k]) for k in SCHEDULE_BUFFERS)
    assert state[POSITION_IDS_KEY].dtype == torch.int64
    assert torch.equal(state[UNET_KEY], tiny_state[UNET_KEY].half())


def test_model_is_built_on_the_meta_device(tiny_file, monkeypatch):
    devices = []

    class Recording(ldm.StableDiffusion):
        def __init__(self, config):
            super().__init__(config)
            devices.append(next(self.parameters()).device)

    monkeypatch.setattr(ckpt, "StableDiffusion", Recording)
    sd = ldm.load(tiny_file)
    assert devices and all(d.type == "meta" for d in devices)
    assert not any(t.is_meta for t in [*sd.parameters(), *sd.buffers()])


# --- the CLI ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tiny_file, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """`python -m ldm info` on a good file, a missing one and random bytes, run side by side (each process spends
    seconds importing torch)."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "random.safetensors").write_bytes(RANDOM_BYTES)
    paths = {"good": tiny_file, "missing": folder / "missing.safetensors", "random": folder / "random.safetensors"}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, "-m", "ldm", "info", str(path)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for name, path in paths.items()}
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[name] = paths[name], subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return runs


def test_cli_info(cli_runs):
    _, out = cli_runs["good"]
    assert out.returncode == 0, out.stderr
    assert "architecture: tiny" in out.stdout


@pytest.mark.parametrize("case", ["missing", "random"])
def test_cli_errors_are_one_line_without_traceback(cli_runs, case):
    path, out = cli_runs[case]
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("ldm info: error:") and path.name in out.stderr


def test_saved_files_get_the_umask_mode_not_0600(tmp_path):
    """mkstemp and safetensors' save_file both create 0600 files; a saved model is an ordinary file."""
    from ldm.models.checkpoint import write_safetensors
    from ldm.generation.images import default_file_mode

    old = os.umask(0o022)
    try:
        path = ldm.save(ldm.StableDiffusion(ldm.preset("tiny")), tmp_path / "m.safetensors")
        write_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert default_file_mode() == 0o644
        assert path.stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
