"""Training with token merging (``visiontools train`` with a ``tome:`` section): the patched training
step, resume, DDP, activation checkpointing, dropout, the recorded r and the loaders that apply it.
Tiny ViTs on real CIFAR-10 images."""
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visiontools
from visiontools.errors import UserError
from visiontools.models import checkpoint as ckpt
from visiontools.models import create_model, load, recommended_r
from visiontools.train import build_optimizer, load_config, lr_at, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def cfg_of(datasets_dir, out_dir, **kw):
    """A resolved config (through ``load_config``, as the command line gives it) of a tiny ViT."""
    base = {"model": "vit_cifar_mini_p4", "model_kwargs": dict(TINY), "data_dir": str(datasets_dir / "cifar10"),
            "train_per_class": 8, "test_per_class": 4, "epochs": 2, "batch_size": 16, "lr": 1e-3,
            "warmup_epochs": 0.5, "threads": 1, "out_dir": str(out_dir)}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**base, **kw}.items()])


def weights(path, prefix="model."):
    tensors, _, _ = ckpt.load_training_state(path)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_the_tome_section_is_parsed_and_checked_before_any_data_is_read(tmp_path):
    assert load_config(None, ["tome.r=12"])["tome"] == {"r": "12", "method": "tome", "prop_attn": True}
    assert load_config(None, ["tome=12,-0.5"])["tome"]["r"] == "12,-0.5"
    assert load_config(None, ["tome={r: [8, 4], method: pitome}"])["tome"] == \
        {"r": "[8,4]", "method": "pitome", "prop_attn": True}
    assert load_config(None, ["tome.flops=0.6"])["tome"] == {"flops": 0.6, "method": "tome", "prop_attn": True}
    assert load_config(None, ["tome.r=0"])["tome"] is None  # r 0 merges nothing: no patch at all
    for bad, words in [("tome.r=-1", "r must be >= 0"), ("tome.rr=4", "did you mean 'r'"),
                       ("tome={r: 4, method: fast}", "is not a method"), ("tome={r: 4, flops: 0.5}", "exactly one of"),
                       ("tome.flops=-1", "positive number")]:
        with pytest.raises(UserError, match=words):
            load_config(None, [bad])
    # a model that cannot merge is refused before the (missing) data is read
    cfg = load_config(None, ["model=lsh_vit_cifar", "tome.r=4", f"data_dir={tmp_path / 'nothing'}",
                             f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="tome: section cannot be used with this model.*LSHAttention"):
        train(cfg, progress=False)
    # an unreachable budget names its own problem, not the model
    cfg = load_config(None, ["tome.flops=0.01", f"data_dir={tmp_path / 'nothing'}", f"out_dir={tmp_path / 'run2'}"])
    with pytest.raises(UserError, match=r"^tome: a FLOP fraction of 0.01 is out of reach: .*keeps 0\.\d+"):
        train(cfg, progress=False)


def test_a_tome_training_step_equals_the_manual_patch_then_step(tmp_path, datasets_dir):
    """One optimizer step of ``train`` with ``tome.r=8`` gives bit for bit the weights of patching the
    model by hand and stepping it on the same batch; an unpatched step gives other weights."""
    from visiontools.data import CIFAR_STATS, load_cifar, normalize, shard_indices

    cfg = cfg_of(datasets_dir, tmp_path / "run", tome={"r": 8}, epochs=1, train_per_class=2, warmup_epochs=0,
                 crop_padding=0, hflip=False, eval_every=1)
    torch.set_num_threads(1)
    train(cfg, progress=False)
    trained = weights(tmp_path / "run" / "last.safetensors")

    ds = load_cifar("cifar10", "train", cfg["data_dir"], False, 2)
    order = shard_indices(len(ds), 0, 1, shuffle=True, seed=cfg["seed"], epoch=0)[:16]
    x, y = normalize(ds.images[order], *CIFAR_STATS["cifar10"]), ds.labels[order]

    def manual(r):
        torch.manual_seed(cfg["seed"])
        model = create_model("vit_cifar_mini_p4", num_classes=10, **TINY)
        if r:
            visiontools.apply_tome(model, r=r)
        opt = build_optimizer(model, cfg)
        for g in opt.param_groups:
            g["lr"] = lr_at(0, 1, 0, cfg["lr"], cfg["min_lr"])
        model.train()
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg["label_smoothing"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        return model.state_dict()

    by_hand = manual(8)
    assert trained.keys() == by_hand.keys()
    assert all(torch.equal(trained[k], by_hand[k]) for k in trained)
    unpatched = manual(0)
    assert not all(torch.equal(trained[k], unpatched[k]) for k in trained)


def test_tome_run_with_ema_and_mixup_resumes_bit_for_bit_and_logs_both_accuracies(tmp_path, datasets_dir):
    kw = dict(tome={"r": "4,-0.5"}, ema_decay=0.9, mixup_alpha=0.4, model_kwargs={**TINY, "drop_path_rate": 0.2})
    full = train(cfg_of(datasets_dir, tmp_path / "full", **kw), progress=False)
    train(cfg_of(datasets_dir, tmp_path / "part", **kw), progress=False, stop_after=1)
    resumed = train(cfg_of(datasets_dir, tmp_path / "part", **kw), resume=True, progress=False)
    a, b = (ckpt.load_training_state(tmp_path / d / "last.safetensors")[0] for d in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("seconds", "step_ms")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in full.items() if k not in timing}
    for key in ("test_top1", "test_top1_tome", "test_top5_tome", "test_loss_tome", "step_ms"):
        assert key in full, key
    # the two accuracies are two evaluations: unpatched (r=0) and at the training setting
    assert full["test_loss"] != full["test_loss_tome"]
    table = (tmp_path / "full" / "results.md").read_text()
    assert "test top-1 % at ToMe r=4,-0.5" in table and "ms / step" in table
    assert f"| 2 | {full['train_loss']:.4f} |" in table


def test_the_checkpoint_records_r_and_load_applies_it(tmp_path, datasets_dir):
    """The export records the training setting; ``load`` returns the model patched at it (``tome=False``:
    unpatched), and it is the recommended r that ``eval``, ``video`` and ``export`` default to."""
    from visiontools.evaluate import default_rs

    out = tmp_path / "export.safetensors"
    train(cfg_of(datasets_dir, tmp_path / "run", tome={"r": "[6,4]", "prop_attn": False}, export=str(out)),
          progress=False)
    model, desc = load(out)
    assert desc["tome"] == {"r": "[6,4]", "method": "tome", "prop_attn": False}
    assert model.tome_r == [6, 4] and model.tome_prop_attn is False and desc["recommended_r"] == [6, 4]
    plain, _ = load(out, tome=False)
    assert not hasattr(plain, "tome_r")
    x = torch.randn(3, 3, 32, 32)
    visiontools.apply_tome(plain, r=[6, 4], prop_attn=False)
    assert torch.equal(model(x), plain(x))
    assert not torch.equal(load(out, tome=False)[0](x), model(x))  # unpatched: other logits
    assert recommended_r(out) == [6, 4]
    assert default_rs(Namespace(model=None, checkpoint=str(out))) == [0, [6, 4]]
    assert default_rs(Namespace(model=None, checkpoint=None)) == [0, 4, 8]  # cifar10_cct's card: r=8
    assert recommended_r("vit_tiny_patch16_224") == 8  # a timm name: the default checkpoint's choice
    for name in (out, "cifar10_vit", "vit_tiny_patch16_224"):  # a bad tome= is refused for every model
        with pytest.raises(ValueError, match=r"^tome must be 'auto' .* or False, got True$"):
            load(name, tome=True)
    from visiontools.demos.model_cache import _load_checkpoint

    dm = _load_checkpoint(str(out))  # the demo opens at the trained r, on an unpatched cached model
    assert dm.recommended_r == 6 and not hasattr(dm.model, "tome_r")


def test_a_flops_budget_is_solved_once_and_recorded_as_its_schedule(tmp_path, datasets_dir):
    cfg = cfg_of(datasets_dir, tmp_path / "run", tome={"flops": 0.6}, epochs=1)
    train(cfg, progress=False)
    _, desc, _ = ckpt.load_training_state(tmp_path / "run" / "last.safetensors")
    assert desc["tome"]["flops"] == 0.6 and desc["tome"]["r"].startswith("[")
    schedule = json.loads(desc["tome"]["r"])
    assert len(schedule) == TINY["depth"] and sum(schedule) > 0


def test_activation_checkpointing_under_tome_trains_the_same_weights(tmp_path, datasets_dir, monkeypatch):
    import visiontools.tome.engine as engine

    calls = []
    real = engine.checkpoint
    monkeypatch.setattr(engine, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = cfg_of(datasets_dir, tmp_path / "a", tome={"r": 6}, epochs=1)
    train(plain, progress=False)
    assert not calls
    train(cfg_of(datasets_dir, tmp_path / "b", tome={"r": 6}, epochs=1, grad_checkpointing=True), progress=False)
    assert len(calls) == TINY["depth"] * 5  # every block of the 5 steps ran checkpointed
    a, b = weights(tmp_path / "a" / "last.safetensors"), weights(tmp_path / "b" / "last.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_dropout_and_drop_path_in_patched_blocks_behave_as_in_timm():
    """In training mode at r=0 the patched blocks draw the same dropout and drop-path masks as timm's."""
    torch.manual_seed(0)
    model = create_model("vit_cifar_mini_p4", num_classes=10, **TINY, drop_path_rate=0.5, proj_drop_rate=0.2).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    ref = model(x)
    visiontools.apply_tome(model, r=0)
    torch.manual_seed(1)
    assert torch.allclose(model(x), ref, atol=1e-6)
    model.tome_r = 6
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(model(x), first)  # still stochastic with merging
    model.eval()
    assert torch.equal(model(x), model(x))


def test_ddp_two_processes_match_one_process_with_tome(tmp_path, datasets_dir):
    """Under torchrun, 2 processes with half the batch each train the weights of 1 process (no augmentation,
    one step: the two shards of the sampler make up the single process's batch)."""
    def run(nproc, out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "visiontools.cli", "train", "--no-progress", "--out-dir", str(out), "--threads", "1",
               "--data-dir", str(datasets_dir / "cifar10"), "--epochs", "1", "--batch-size", "16",
               "--set", "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "--set", "tome.r=8",
               "--set", "train_per_class=2", "--set", "test_per_class=2", "--set", "crop_padding=0",
               "--set", "hflip=false", "--set", "warmup_epochs=0"]
        res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert one["test_top1_tome"] == two["test_top1_tome"] and one["train_images"] == two["train_images"] == 16
    a, b = weights(tmp_path / "one" / "last.safetensors"), weights(tmp_path / "two" / "last.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_the_curve_shows_both_accuracies_and_the_step_time(tmp_path, monkeypatch):
    from visiontools.train import plot_curve

    history = [{"epoch": e, "train_top1": 10.0 * e, "train_loss": 2.0 / e, "lr": 1e-3 / e, "test_top1": 20.0 * e,
                "test_top1_tome": 19.0 * e, "step_ms": 50.0 + e, "seconds": 9.0} for e in (1, 2)]
    lines = {}
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda fig, *a, **k: lines.update(
        {ax.get_ylabel(): [(l.get_label(), list(l.get_ydata())) for l in ax.lines] for ax in fig.axes}))
    plot_curve(history, tmp_path / "curve.png", "t", "ToMe r=13")
    assert lines["top-1 %"][1:] == [("test, unpatched", [20.0, 40.0]), ("test at ToMe r=13", [19.0, 38.0])]
    assert lines["ms per training step"] == [(lines["ms per training step"][0][0], [51.0, 52.0])]
    del history[0]["test_top1_tome"]  # a run resumed with a tome: section it was not started with
    plot_curve(history, tmp_path / "curve.png", "t", "ToMe r=13")
    assert lines["top-1 %"][1:] == [("test, unpatched", [20.0, 40.0]), ("test at ToMe r=13", [38.0])]


@pytest.mark.parametrize("name", ["hyena_vit_cifar", "conformer_vit_cifar"])
def test_grid_models_train_with_merging_through_their_grid_operations(tmp_path, datasets_dir, monkeypatch, name):
    """Hyena and Conformer ViTs train under ``tome:``: every parameter gets a gradient (the grid
    operations see the merged tokens) and the run evaluates both settings."""
    cfg = cfg_of(datasets_dir, tmp_path / "run", model=name, model_kwargs={"depth": 2}, tome={"r": 6}, epochs=1,
                 train_per_class=2)
    seen = {}
    real = torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):
        params = list(params)
        seen.update(no_grad=sum(p.grad is None for p in params), n=len(params))
        return real(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    last = train(cfg, progress=False)
    assert seen["n"] > 0 and seen["no_grad"] == 0
    assert "test_top1_tome" in last and last["test_loss"] != last["test_loss_tome"]
    model, desc = load(tmp_path / "run" / "last.safetensors")
    assert desc["tome"]["r"] == "6" and model.tome_r == 6


def test_the_shipped_tome_checkpoint_loads_at_its_trained_r_and_beats_inference_only_merging(datasets_dir):
    """``cifar10_cct_tome`` (``cifar10_cct`` fine-tuned at r=13) records r=13, loads patched at it, and at
    r=13 classifies the first 20 test images of every class better than ``cifar10_cct`` merged at r=13
    without training (the card's full-test-set numbers: 85.92 % against 84.82 %). Its 64 tokens cap r=13
    in the later blocks: the model loads at the schedule training ran, so it never warns of the cap."""
    import warnings

    from visiontools.data import load_cifar, normalize

    model, desc = load("cifar10_cct_tome")
    assert desc["tome"] == {"r": "13", "method": "tome", "prop_attn": True}
    assert model.tome_r == [13, 13, 13, 12, 6, 3, 2]  # 64 -> 51 -> 38 -> 25 -> 13 -> 7 -> 4 -> 2 tokens
    assert recommended_r("cifar10_cct_tome") == 13
    base, _ = load("cifar10_cct")
    visiontools.apply_tome(base, r=13)
    ds = load_cifar("cifar10", "test", datasets_dir / "cifar10", max_per_class=20)
    x = normalize(ds.images, desc["mean"], desc["std"])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the loaded model: no cap warning
        tuned = (model(x).argmax(1) == ds.labels).float().mean().item()
    with torch.no_grad(), pytest.warns(UserWarning, match="more than block 3 can merge"):
        plain = (base(x).argmax(1) == ds.labels).float().mean().item()
    assert tuned > 0.75 and tuned > plain
