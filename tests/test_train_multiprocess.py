"""Two CPU processes over gloo through `accelerate launch`: the same training as one process with the same global
batch, one writer (rank 0), identical EMA on every rank, and a bit-exact resume after SIGKILL."""
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from ldm.training import train as T

from test_train import assert_same_training, losses  # noqa: E402
from test_train_data import write_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu`: without a GPU, ldm's Accelerator(cpu=True) makes it a gloo group."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(free_port()),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldm.training.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    # on a timeout the launcher and its workers are killed: a hung rank left behind would slow every later test,
    # and holds the output pipes, so that reading them to the end would hang the test (torch's elastic agent starts
    # each worker in a session of its own, out of reach of the launcher's process group)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"`accelerate launch` timed out after 240 s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def write_config(tmp_path: Path, **sections) -> Path:
    data = write_folder(tmp_path / "data", 12, sizes=((64, 64), (80, 64), (64, 96)))
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 0, "model": {"preset": "tiny"},
           "data": {"path": str(data), "resolution": 64, "random_flip": True},
           "train": {"max_steps": 4, "batch_size": 4, "lr": LR, "warmup_steps": 1},
           "checkpoint": {"every": 2, "keep": 5}, "log": {"progress_bar": False}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    pytest.importorskip("ldm.generation.pipeline")
    path = write_config(tmp_path, validation={"every": 2, "prompts": ["a red square"], "steps": 2})
    one, two = tmp_path / "one", tmp_path / "two"
    T.train(T.load_train_config(path, [f"run_dir={one}"]))
    out = launch(2, str(path), f"run_dir={two}", "train.batch_size=2")  # 2 ranks x 2 = the same global batch of 4
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_training(one, two, step=4, lr=LR)

    # Rank 0 alone writes the log, the samples and the checkpoint; each rank adds its own RNG state.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (two / "samples").iterdir()) == ["step-2.png", "step-4.png"]
    ckpt = two / "checkpoints" / "step-4"
    assert {"random_states_0.pkl", "random_states_1.pkl", "weights.safetensors", "ema.safetensors",
            "optimizer.bin", "scheduler.bin", "train_state.json"} <= {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["ema_updates"] == 4  # one EMA update per optimizer step
    a, b = state["ema_fingerprints"]
    assert a == b  # every rank holds the same EMA


def test_two_process_run_resumes_bit_exactly_after_sigkill(tmp_path):
    path = write_config(tmp_path, train={"batch_size": 1, "grad_accum": 2, "max_steps": 6})
    a, b = tmp_path / "a", tmp_path / "b"
    whole = launch(2, str(path), f"run_dir={a}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch(2, str(path), f"run_dir={b}", env={T.DEBUG_KILL_ENV: "3"})
    assert killed.returncode != 0
    assert sorted(p.name for p in (b / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-2"]
    resumed = launch(2, str(path), f"run_dir={b}", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(b) == losses(a) and len(losses(a)) == 6
