"""visiontools.train / visiontools.models.checkpoint: config, schedule, exact resume, atomic checkpoints,
2-process torchrun (gloo) on a tiny ViT and real CIFAR-10 images."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from visiontools.models import checkpoint as ckpt
from visiontools.models import load_checkpoint_model
from visiontools.train import DEFAULTS, load_config, lr_at, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_cfg(datasets_dir, out_dir, **kw):
    cfg = load_config(None, [])
    cfg.update(model="vit_cifar_mini_p4", model_kwargs=dict(TINY), data_dir=str(datasets_dir / "cifar10"),
               train_per_class=8, test_per_class=4, epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0.5,
               threads=1, out_dir=str(out_dir))
    cfg.update(kw)
    return cfg


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_config_file_overrides_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nmodel_kwargs: {depth: 2}\namp: off\n")
    cfg = load_config(f, ["lr=0.01", "model_kwargs.embed_dim=64", "randaugment=[2, 9]"])
    assert cfg["epochs"] == 3 and cfg["lr"] == 0.01 and cfg["amp"] == "off"
    assert cfg["model_kwargs"] == {"depth": 2, "embed_dim": 64} and cfg["randaugment"] == [2, 9]
    assert cfg["batch_size"] == DEFAULTS["batch_size"]
    f.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epoch'\]"):
        load_config(f)
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        load_config(None, ["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["lr"])
    with pytest.raises(FileNotFoundError, match="config file"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for f in sorted((ROOT / "configs").glob("vit_*.yaml")):
        cfg = load_config(f)
        assert cfg["model"].startswith("vit_cifar_")


def test_cpu_bf16_detection_reads_the_cpu_flags(tmp_path):
    from visiontools.timing import cpu_has_bf16

    def has(text):
        (tmp_path / "cpuinfo").write_text(text)
        return cpu_has_bf16(str(tmp_path / "cpuinfo"))

    assert has("processor : 0\nflags : fpu sse avx2 avx512f avx512bw\n") is False
    assert has("flags : fpu avx512f avx512_bf16 amx_tile\n") is True
    assert has("flags : fpu amx_bf16 amx_tile\n") is True
    assert has("Features : fp asimd sve bf16 i8mm\n") is True  # Arm
    assert has("") is False
    assert cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("has_bf16", [False, True])
def test_amp_uses_bf16_on_a_cpu_only_with_bf16_hardware(monkeypatch, capsys, has_bf16):
    """``amp: auto`` is bf16 on a CPU with AVX512-BF16/AMX and fp32 without it; an explicit ``bf16``
    without the hardware is kept but warns (emulated bf16 runs about 10x slower); every shipped CPU
    recipe trains in fp32 on a CPU without bf16 hardware."""
    import visiontools.timing as timing
    from visiontools.train import training_dtype

    monkeypatch.setattr(timing, "cpu_has_bf16", lambda *a, **k: has_bf16)
    cpu = torch.device("cpu")
    assert training_dtype("auto", cpu) == (torch.bfloat16 if has_bf16 else torch.float32)
    assert training_dtype("off", cpu) == torch.float32
    assert capsys.readouterr().err == ""
    assert training_dtype("bf16", cpu) == torch.bfloat16
    err = capsys.readouterr().err
    assert ("without bf16 hardware" in err and "--amp auto" in err) != has_bf16
    if not has_bf16:
        for f in sorted((ROOT / "configs").glob("*_cpu.yaml")):
            assert training_dtype(load_config(f, [])["amp"], cpu) == torch.float32, f.name
        assert capsys.readouterr().err == ""


def test_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.001


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, datasets_dir, monkeypatch):
    import visiontools.train as train_module

    full = tiny_cfg(datasets_dir, tmp_path / "full", model_kwargs={**TINY, "drop_path_rate": 0.1})
    train(full, progress=False)
    part = {**full, "out_dir": str(tmp_path / "part")}
    train(part, progress=False, stop_after=1)
    first_epoch = read_log(tmp_path / "part/log.jsonl")
    assert len(first_epoch) == 1
    with pytest.raises(FileExistsError, match="--resume"):
        train(part, progress=False)  # never silently restarts over an existing run
    steps, lr_at_steps = [], train_module.lr_at
    monkeypatch.setattr(train_module, "lr_at", lambda step, *a: steps.append(step) or lr_at_steps(step, *a))
    train(part, resume=True, progress=False)
    # the resumed run trained only the second epoch (steps 5..9), and kept epoch 1's record, timing included
    assert steps == [5, 6, 7, 8, 9]
    assert read_log(tmp_path / "part/log.jsonl")[0] == first_epoch[0]

    a, _, sa = ckpt.load_training_state(tmp_path / "full/last.safetensors")
    b, _, sb = ckpt.load_training_state(tmp_path / "part/last.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # weights and AdamW state, bit for bit
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"]) == (2, 10)
    def strip(log):
        return [{k: v for k, v in r.items() if k not in ("seconds", "step_ms")} for r in log]  # timings
    assert strip(read_log(tmp_path / "full/log.jsonl")) == strip(read_log(tmp_path / "part/log.jsonl"))


def test_more_epochs_after_the_warm_up_continue_as_an_uninterrupted_run(tmp_path, datasets_dir, capsys):
    """A run stopped at the end of its warm-up and resumed with more epochs ends as a run given that
    many epochs from the start (the schedules agree through the warm-up), and says so instead of
    warning; resumed later than the warm-up, it warns that the result differs."""
    full = tiny_cfg(datasets_dir, tmp_path / "full", epochs=3, warmup_epochs=1.0)
    train(full, progress=False)
    part = {**full, "out_dir": str(tmp_path / "part"), "epochs": 2}
    train(part, progress=False, stop_after=1)
    capsys.readouterr()
    train({**part, "epochs": 3}, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "continues as an uninterrupted 3-epoch run would" in err and "differs" not in err
    assert "changed settings" not in err  # epochs alone: the schedule note above says it all
    a, _, _ = ckpt.load_training_state(tmp_path / "full/last.safetensors")
    b, _, _ = ckpt.load_training_state(tmp_path / "part/last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # after the warm-up: a warning; a changed training setting is named with its old and new value
    train({**part, "epochs": 4, "label_smoothing": 0.0}, resume=True, progress=False, stop_after=3)
    err = capsys.readouterr().err
    assert "so the result differs from an uninterrupted 4-epoch run" in err
    assert "with changed settings (label_smoothing 0.1 -> 0.0)" in err


def test_training_curve_is_drawn_after_every_epoch(tmp_path, datasets_dir, monkeypatch):
    """``out_dir/curve.png`` is redrawn after each epoch from the whole log: train and test top-1,
    train loss and learning rate, one point per epoch so far."""
    from PIL import Image

    import visiontools.train as train_module

    drawn = []
    real = train_module.plot_curve
    monkeypatch.setattr(train_module, "plot_curve", lambda history, path, title, tome=None:
                        drawn.append((len(history), path)) or real(history, path, title, tome))
    cfg = tiny_cfg(datasets_dir, tmp_path, epochs=2, ema_decay=0.9)
    train(cfg, progress=False)
    assert drawn == [(1, tmp_path / "curve.png"), (2, tmp_path / "curve.png")]
    with Image.open(tmp_path / "curve.png") as im:
        assert im.size == (1400, 380)
    history = read_log(tmp_path / "log.jsonl")
    fig_lines = {}
    monkeypatch.setattr("matplotlib.figure.Figure.savefig",
                        lambda fig, *a, **k: fig_lines.update({ax.get_ylabel(): [list(l.get_ydata()) for l in ax.lines]
                                                               for ax in fig.axes}))
    real(history, tmp_path / "again.png", "t")
    assert fig_lines["top-1 %"] == [[r["train_top1"] for r in history], [r["test_top1"] for r in history]]
    assert fig_lines["loss"] == [[r["train_loss"] for r in history]]
    assert fig_lines["learning rate"] == [[r["lr"] for r in history]]
    assert fig_lines["ms per training step"] == [[r["step_ms"] for r in history]]


def test_overwrite_keeps_a_backup(tmp_path, datasets_dir):
    cfg = tiny_cfg(datasets_dir, tmp_path, epochs=1)
    train(cfg, progress=False)
    first = (tmp_path / "last.safetensors").read_bytes()
    train({**cfg, "seed": 1}, overwrite=True, progress=False)
    assert (tmp_path / "last.safetensors.bak").read_bytes() == first
    assert (tmp_path / "last.safetensors").read_bytes() != first


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    ckpt.save_safetensors_atomic(path, {"w": torch.ones(3)}, {"visiontools": "{}"})
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "fsync", crash)  # fails after the temp file is written, before the rename
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_safetensors_atomic(path, {"w": torch.zeros(1000)}, {"visiontools": "{}"})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # temp file removed


KILL_WRITER = """
import sys, torch
from visiontools.models.checkpoint import save_safetensors_atomic
path = sys.argv[1]
i = 0
print("ready", flush=True)
while True:
    i += 1
    save_safetensors_atomic(path, {"w": torch.full((300_000,), float(i))}, {"i": str(i)})
"""


def test_kill_during_writes_never_leaves_a_partial_checkpoint(tmp_path):
    from safetensors import safe_open
    path = tmp_path / "last.safetensors"
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with safe_open(str(path), framework="pt") as f:  # complete and consistent
            i = int(f.metadata()["i"])
            w = f.get_tensor("w")
        assert i >= 1 and w.shape == (300_000,) and bool((w == i).all())


def test_export_for_inference_loads_and_predicts_like_the_training_checkpoint(tmp_path, datasets_dir):
    cfg = tiny_cfg(datasets_dir, tmp_path, epochs=1, export=str(tmp_path / "model.safetensors"))
    train(cfg, progress=False)
    m32, desc32 = load_checkpoint_model(tmp_path / "last.safetensors")
    m16, desc16 = load_checkpoint_model(tmp_path / "model.safetensors")
    assert desc16["classes"][:2] == ["airplane", "automobile"] and desc16["model"] == "vit_cifar_mini_p4"
    assert len(desc16["history"]) == 1
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m32(x), m16(x), atol=2e-2)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        (tmp_path / "bad.safetensors").write_bytes(b"garbage")
        load_checkpoint_model(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_model(tmp_path / "missing.safetensors")


def test_bad_data_dir_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"expected either an ImageFolder tree"):
        train(cfg, progress=False)


def test_torchrun_two_cpu_processes_and_resume(tmp_path, datasets_dir):
    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "visiontools.cli", "train", "--no-progress", "--out-dir", str(out), "--threads", "1",
               "--data-dir", str(datasets_dir / "cifar10"), "--epochs", "2", "--batch-size", "16",
               "--set", "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
               "--set", "train_per_class=8", "--set", "test_per_class=5", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return [json.loads(line)["epoch"] for line in res.stdout.splitlines() if line.startswith("{")]

    out = tmp_path / "ddp"
    assert torchrun(out) == [1, 2]
    log = read_log(out / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    # metrics are reduced over both ranks: every training step saw 16 images (8 per rank), every
    # test image was counted once
    assert [r["train_images"] for r in log] == [80, 80] and [r["test_images"] for r in log] == [50, 50]
    _, _, state = ckpt.load_training_state(out / "last.safetensors")
    assert state["world_size"] == 2 and state["step"] == 10
    model, desc = load_checkpoint_model(out / "last.safetensors")
    assert desc["classes"][3] == "cat"

    # killed after epoch 1, resumed under torchrun: only epoch 2 runs, and it ends bit for bit where
    # the uninterrupted run did
    part = tmp_path / "part"
    assert torchrun(part, "--stop-after", "1") == [1]
    first_epoch = read_log(part / "log.jsonl")[0]
    assert torchrun(part, "--resume") == [2]
    assert read_log(part / "log.jsonl")[0] == first_epoch
    a, _, _ = ckpt.load_training_state(out / "last.safetensors")
    b, _, sb = ckpt.load_training_state(part / "last.safetensors")
    assert a.keys() == b.keys() and sb["step"] == 10
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weight_ema_update_and_warmup():
    from visiontools.train import WeightEMA
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, 0.99)
    w0 = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(8, 3))  # moves the BatchNorm running stats, increments num_batches_tracked
    ema.update(model, step=0)  # warm-up: decay min(0.99, 1/10) = 0.1
    torch.testing.assert_close(ema.model[0].weight, 0.1 * w0 + 0.9 * model[0].weight)
    torch.testing.assert_close(ema.model[1].running_mean, 0.9 * model[1].running_mean)
    assert ema.model[1].num_batches_tracked.item() == 1
    before = ema.model[0].weight.clone()
    ema.update(model, step=10_000)  # decay 0.99
    torch.testing.assert_close(ema.model[0].weight, 0.99 * before + 0.01 * model[0].weight)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="ema_decay must be in"):
        WeightEMA(model, 1.5)


def test_ema_run_resumes_exactly_and_exports_the_ema_weights(datasets_dir, tmp_path):
    full = tiny_cfg(datasets_dir, tmp_path / "full", ema_decay=0.9)
    train(full, progress=False)
    part = tiny_cfg(datasets_dir, tmp_path / "part", ema_decay=0.9)
    train(part, progress=False, stop_after=1)
    train(part, resume=True, progress=False)
    a, _ = ckpt.read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, _ = ckpt.read_checkpoint(tmp_path / "part" / "last.safetensors")
    ema_keys = [k for k in a if k.startswith("ema.")]
    assert ema_keys and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ema.head.weight"], a["model.head.weight"])
    from visiontools.models import create_model
    torch.manual_seed(full["seed"])  # the run's initial weights: the EMA must have moved from them towards the model
    init = create_model(full["model"], num_classes=10, **full["model_kwargs"]).state_dict()["head.weight"]
    assert (a["ema.head.weight"] - a["model.head.weight"]).norm() < 0.5 * (init - a["model.head.weight"]).norm()
    assert read_log(tmp_path / "full" / "log.jsonl")[-1]["test_weights"] == "ema"
    model, _ = load_checkpoint_model(tmp_path / "full" / "last.safetensors")
    assert torch.equal(model.head.weight, a["ema.head.weight"])
    ckpt.export_for_inference(tmp_path / "full" / "last.safetensors", tmp_path / "w.safetensors")
    w, _ = ckpt.read_checkpoint(tmp_path / "w.safetensors")
    assert torch.equal(w["model.head.weight"], a["ema.head.weight"].half())
    noema = tiny_cfg(datasets_dir, tmp_path / "noema")
    train(noema, progress=False, stop_after=1)
    noema["ema_decay"] = 0.9
    with pytest.raises(ValueError, match="holds no EMA weights"):
        train(noema, resume=True, progress=False)

