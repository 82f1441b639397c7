"""visiontools.evaluate and the shipped CIFAR-10 ViT: accuracy tables with and without ToMe on real
CIFAR-10 test images and on the ImageNet sample folder, and the shipped checkpoint's recorded accuracy."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from visiontools.cli import main as cli_main
from visiontools.data import ImageNetFolder, load_cifar, normalize, timm_eval_transform
from visiontools.evaluate import candidate_settings, evaluate, markdown_table
from visiontools.models import DEFAULT_CHECKPOINT, SHIPPED, load_checkpoint_model, load_default_model

ROOT = Path(__file__).resolve().parents[1]


def top1(model, x, y):
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name,floor", [("cifar10_cct", 80.0), ("cifar10_vit", 40.0)])
def test_shipped_checkpoint_classifies_real_cifar10_at_its_recorded_accuracy(name, floor, recorded_subset):
    """The default (cifar10_cct) and the plain ViT: trained weights, at the accuracy their cards record."""
    path = SHIPPED[name]
    assert path.is_file() and path.stat().st_size < 11e6
    model, meta = load_checkpoint_model(name) if name != DEFAULT_CHECKPOINT else load_default_model()
    assert not model.training and meta["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                      "frog", "horse", "ship", "truck"]
    rec = meta["subset_accuracy"]  # recorded when the checkpoint was shipped
    acc, _, labels = recorded_subset(model, meta)
    assert len(labels) == rec["n"] == 200
    assert acc == pytest.approx(rec["top1"], abs=1.0)
    assert acc > floor  # a trained model (chance is 10%)
    # the full-test-set evaluation shipped beside it
    assert meta["eval"]["rows"][0]["name"] == "unpatched" and meta["eval"]["n_images"] == 10000


@pytest.mark.parametrize("name,floor", [("hyena_cifar10", 45.0), ("attn_cifar10", 30.0)])
def test_shipped_hyena_and_its_attention_twin_classify_real_cifar10_at_their_recorded_accuracy(name, floor,
                                                                                             recorded_subset):
    assert SHIPPED[name].is_file() and SHIPPED[name].stat().st_size < 2e6
    model, meta = load_checkpoint_model(name)
    acc, _, _ = recorded_subset(model, meta)
    assert acc == pytest.approx(meta["subset_accuracy"]["top1"], abs=1.0) and acc > floor  # trained (chance is 10%)
    assert meta["params"] == sum(p.numel() for p in model.parameters())


def test_eval_table_on_real_cifar10_subset(tmp_path, datasets_dir):
    res = evaluate(data_dir=str(datasets_dir / "cifar10"), per_class=5, rs=[0, 8], schedules=[(8, -0.5)],
                   batch_size=25, timing_batch_size=8, repeats=2, warmup=1, progress=False)
    names = [r["name"] for r in res["rows"]]
    assert names == ["unpatched", "ToMe r=0", "ToMe r=8", "ToMe r=8,-0.5"]
    rows = {r["name"]: r for r in res["rows"]}
    assert res["n_images"] == 50 and all(r["n"] == 50 for r in res["rows"])
    # accuracy equals a direct computation on the same images
    model, meta = load_default_model()
    ds = load_cifar("cifar10", "test", datasets_dir / "cifar10", max_per_class=5)
    assert rows["unpatched"]["top1"] == pytest.approx(top1(model, normalize(ds.images, meta["mean"], meta["std"]),
                                                           ds.labels))
    assert rows["ToMe r=0"]["top1"] == rows["unpatched"]["top1"]  # r=0 merges nothing
    assert rows["ToMe r=8"]["tokens_per_layer"] == [64, 56, 48, 40, 32, 24, 16, 8]  # cifar10_cct: 64 tokens, 7 blocks
    assert rows["ToMe r=8"]["gflops"] < rows["ToMe r=0"]["gflops"] and rows["ToMe r=8"]["flop_ratio"] > 1.5
    assert rows["ToMe r=8,-0.5"]["r"] == [8, -0.5]
    assert rows["unpatched"]["speedup"] == 1.0 and all(r["images_per_s"] > 0 for r in res["rows"])
    md = markdown_table(res)
    params = sum(p.numel() for p in load_default_model()[0].parameters())
    assert all(r["params"] == params for r in res["rows"])  # ToMe adds no parameters
    assert md.count("\n") == 2 + 4 and f"| ToMe r=8 | {params / 1e6:.2f} | 64 -> 16 |" in md


def test_eval_compare_puts_other_checkpoints_beside_the_model(datasets_dir):
    """--compare: the Hyena ViT beside the CIFAR-10 ViT, on the same images, timed in the same rounds."""
    from visiontools.evaluate import load_comparisons

    data_dir = str(datasets_dir / "cifar10")
    res = evaluate(checkpoint="cifar10_vit", compare=["hyena_cifar10"], data_dir=data_dir, per_class=3, rs=[4],
                   batch_size=30, timing_batch_size=4, repeats=2, warmup=1, progress=False)
    assert [r["name"] for r in res["rows"]] == ["unpatched", "ToMe r=4", "hyena_cifar10"]
    hy = res["rows"][2]
    alone = evaluate(checkpoint="hyena_cifar10", data_dir=data_dir, per_class=3, rs=[], batch_size=30,
                     timing_batch_size=4, repeats=1, warmup=0, progress=False)["rows"][0]
    assert (hy["top1"], hy["top5"], hy["n"]) == (alone["top1"], alone["top5"], 30)
    assert hy["params"] == sum(p.numel() for p in load_checkpoint_model("hyena_cifar10")[0].parameters())
    assert hy["tokens_per_layer"] is None and hy["speedup"] > 0 and hy["gflops"] > 0
    assert "| hyena_cifar10 | 0.30 | all |" in markdown_table(res)
    _, desc = load_default_model()
    with pytest.raises(ValueError, match="--compare hyena_cifar10: its mean"):
        load_comparisons(["hyena_cifar10"], {**desc, "mean": [0.5, 0.5, 0.5]}, torch.device("cpu"))


def test_eval_train_memory_column_measures_a_training_step_without_touching_the_model(datasets_dir):
    """--train-memory: each row's peak memory of one training step, on a copy of the model."""
    import copy

    import timm

    from visiontools.evaluate import training_peak_memory
    from visiontools.bench.memory import peak_memory

    res = evaluate(checkpoint="attn_cifar10", compare=["lsh_cifar10"], data_dir=str(datasets_dir / "cifar10"),
                   per_class=1, rs=[], batch_size=10, timing_batch_size=2, repeats=1, warmup=0, progress=False,
                   train_memory_batch=8)
    attn, lsh = res["rows"]
    model = load_checkpoint_model("attn_cifar10")[0].train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    direct = peak_memory(lambda: torch.nn.functional.cross_entropy(model(x), y).backward(), torch.device("cpu"),
                         autograd=True)
    assert attn["train_peak_bytes"] == direct and attn["train_memory_batch"] == 8
    assert lsh["train_peak_bytes"] > 0
    assert "training peak MB (batch 8) |" in markdown_table(res)
    assert f"| {attn['train_peak_bytes'] / 2**20:.1f} |" in markdown_table(res)

    bn_model = timm.create_model("conformer_vit_cifar", depth=1).eval()  # BatchNorm: a train step would update it
    before = copy.deepcopy(bn_model.state_dict())
    training_peak_memory({"m": bn_model}, x, y, torch.device("cpu"))
    assert not bn_model.training and all(torch.equal(before[k], v) for k, v in bn_model.state_dict().items())
    assert all(p.grad is None for p in bn_model.parameters())


def test_compare_names_checkpoints_with_the_same_file_name_by_their_folder(tmp_path):
    """Two runs' last.safetensors must both appear (a repeated stem once silently dropped one)."""
    import shutil

    from visiontools.evaluate import load_comparisons
    from visiontools.models import SHIPPED

    for run, name in (("run_a", "attn_cifar10"), ("run_b", "lsh_cifar10")):
        (tmp_path / run).mkdir()
        shutil.copy(SHIPPED[name], tmp_path / run / "last.safetensors")
        shutil.copy(SHIPPED[name].with_suffix(".json"), tmp_path / run / "last.json")
    _, desc = load_checkpoint_model("attn_cifar10")
    paths = [str(tmp_path / "run_a" / "last.safetensors"), str(tmp_path / "run_b" / "last.safetensors")]
    got = load_comparisons(paths, desc, torch.device("cpu"))
    assert list(got) == ["run_a_last", "run_b_last"]
    assert sum(p.numel() for p in got["run_b_last"].parameters()) != sum(p.numel() for p in got["run_a_last"].parameters())
    assert list(load_comparisons(["lsh_cifar10", paths[0]], desc, torch.device("cpu"))) == ["lsh_cifar10", "last"]
    with pytest.raises(ValueError, match="is given twice"):
        load_comparisons([paths[0], paths[0]], desc, torch.device("cpu"))


def test_eval_cli_writes_markdown_json_and_plot(tmp_path, datasets_dir):
    out = tmp_path / "ev"
    rc = cli_main(["eval", "--data-dir", str(datasets_dir / "cifar10"), "--per-class", "2", "--r", "4",
                   "--schedule", "4,-0.5", "--timing-batch-size", "4", "--repeats", "2", "--warmup", "1",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads(Path(str(out) + ".json").read_text())
    assert [r["name"] for r in result["rows"]] == ["unpatched", "ToMe r=4", "ToMe r=4,-0.5"]
    assert "| ToMe r=4 |" in Path(str(out) + ".md").read_text() and "CPU" in result["machine"]
    with Image.open(str(out) + ".png") as im:
        assert im.size[0] > 300


def test_eval_r_takes_every_form_of_the_one_grammar(tmp_path, datasets_dir):
    """--r takes an int, r,inflection and a per-layer list (one row each); --schedule keeps reading two
    values as r,inflection (4,1 is inflection 1); the rows are ToMe-patched with exactly those settings."""
    out = tmp_path / "ev"
    rc = cli_main(["eval", "--data-dir", str(datasets_dir / "cifar10"), "--per-class", "1", "--r", "2", "4,-0.5",
                   "8,8,4,4,2,2,2", "--schedule", "4,1", "--timing-batch-size", "2", "--repeats", "1", "--warmup", "0",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = json.loads(Path(str(out) + ".json").read_text())["rows"]
    assert [(r["name"], r["r"]) for r in rows] == [("unpatched", None), ("ToMe r=2", 2), ("ToMe r=4,-0.5", [4, -0.5]),
                                                   ("ToMe r=[8,8,4,4,2,2,2]", [8, 8, 4, 4, 2, 2, 2]),
                                                   ("ToMe r=4,1", [4, 1.0])]
    assert rows[3]["tokens_per_layer"] == [64, 56, 48, 44, 40, 38, 36, 34]


def test_eval_on_imagenet_folder_uses_wordnet_labels(datasets_dir):
    folder_dir = datasets_dir / "imagenet-samples"
    res = evaluate(model_name="vit_cifar_mini_p4", dataset="imagenet", data_dir=str(folder_dir), rs=[4],
                   batch_size=50, timing_batch_size=4, repeats=2, warmup=1, progress=False)
    assert res["n_images"] == 100 and [r["name"] for r in res["rows"]] == ["unpatched", "ToMe r=4"]
    assert res["rows"][1]["tokens_per_layer"][:3] == [65, 61, 57]
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in res["rows"])


def test_eval_imagenet_matches_direct_computation(datasets_dir):
    """A model is built once and evaluated both ways, so the labels are compared, not the weights."""
    from visiontools.evaluate import EvalData, accuracy, build_candidates
    model = timm.create_model("vit_cifar_mini_p4", num_classes=1000).eval()
    folder = ImageNetFolder(datasets_dir / "imagenet-samples", transform=timm_eval_transform(model))
    data = EvalData("folder", folder=folder)
    acc = accuracy(build_candidates(model, [("unpatched", None)]), data, 50, torch.device("cpu"))
    xs = torch.stack([folder[i][0] for i in range(len(folder))])
    ys = torch.tensor([folder.samples[i][1] for i in range(len(folder))])
    with torch.no_grad():
        logits = model(xs)
    assert acc["unpatched"]["top1"] == pytest.approx(100.0 * (logits.argmax(1) == ys).float().mean().item())
    assert acc["unpatched"]["top5"] == pytest.approx(
        100.0 * (logits.topk(5, 1).indices == ys[:, None]).any(1).float().mean().item())


def test_eval_errors_are_clear(tmp_path, datasets_dir):
    with pytest.raises(ValueError, match="needs --data-dir"):
        evaluate(model_name="vit_cifar_mini_p4", dataset="imagenet", progress=False)
    with pytest.raises(FileNotFoundError, match="ImageFolder tree"):
        evaluate(data_dir=str(tmp_path / "nowhere"), progress=False)
    with pytest.raises(ValueError, match="trained on cifar10, not cifar100"):
        evaluate(dataset="cifar100", data_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        evaluate(model_name="no_such_model", dataset="cifar10", progress=False)
    with pytest.raises(ValueError, match="r must be >= 0"):
        candidate_settings([-1], [])
    with pytest.raises(SystemExit):  # argparse: one line naming the value and the accepted forms
        cli_main(["eval", "--schedule", "8,x"])
    with pytest.raises(FileNotFoundError, match="shipped names"):
        load_checkpoint_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="--checkpoint vit_cifar_mini_p4: not a shipped checkpoint.*--model instead"):
        evaluate(checkpoint="vit_cifar_mini_p4", progress=False)  # never random weights in place of a checkpoint
    with pytest.raises(ValueError, match="--compare takes checkpoints"):
        evaluate(data_dir=str(datasets_dir / "cifar10"), per_class=1, compare=["attn_vit_cifar"], progress=False)


def test_eval_under_torchrun_matches_single_process(tmp_path, datasets_dir):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "visiontools.cli", "eval", "--data-dir", str(datasets_dir / "cifar10"), "--per-class", "3",
           "--tome-r", "6", "--timing-batch-size", "4", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = json.loads(Path(str(out) + ".json").read_text())
    assert ddp["world_size"] == 2 and ddp["n_images"] == 30
    single = evaluate(data_dir=str(datasets_dir / "cifar10"), per_class=3, rs=[6], timing_batch_size=4,
                      repeats=1, warmup=0, progress=False)
    assert [(r["top1"], r["top5"]) for r in ddp["rows"]] == [(r["top1"], r["top5"]) for r in single["rows"]]


def test_eval_refuses_an_existing_out_unless_overwrite(tmp_path, datasets_dir, capsys):
    """An explicit --out onto an earlier result is refused (one line naming the file and --overwrite),
    before any data is read; --overwrite replaces it."""
    out = tmp_path / "ev"
    Path(str(out) + ".json").write_text("earlier result")
    rc = cli_main(["eval", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("visiontools: error: "), err
    assert f"{out}.json already exists" in err and "--overwrite" in err and "--out" in err, err
    assert Path(str(out) + ".json").read_text() == "earlier result"
    rc = cli_main(["eval", "--data-dir", str(datasets_dir / "cifar10"), "--per-class", "1", "--r", "4",
                   "--timing-batch-size", "2", "--repeats", "1", "--warmup", "0", "--out", str(out),
                   "--overwrite", "--no-progress"])
    assert rc == 0 and json.loads(Path(str(out) + ".json").read_text())["rows"][1]["name"] == "ToMe r=4"
