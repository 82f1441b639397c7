"""visiontools eval --budget ... --method ...: methods side by side at equal FLOPs on real CIFAR-10 images."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from visiontools.cli import main as cli_main
from visiontools.evaluate import budget_settings, evaluate, method_settings


def test_eval_budget_sweep_writes_one_table_and_plot(tmp_path, datasets_dir):
    out = tmp_path / "ev"
    rc = cli_main(["eval", "--data-dir", str(datasets_dir / "cifar10"), "--per-class", "2", "--budget", "0.6", "0.8",
                   "--method", "tome", "prune", "--timing-batch-size", "4", "--repeats", "2", "--warmup", "1",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    result = json.loads(Path(str(out) + ".json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["unpatched", "tome @0.60", "tome @0.80", "prune @0.60", "prune @0.80"]  # no r rows
    for name, r in list(rows.items())[1:]:
        assert 1 / r["flop_ratio"] <= r["budget"] + 1e-9 and r["method"] == name.split()[0]
        assert isinstance(r["r"], list) and len(r["r"]) == 7  # one r per block of the default cifar10_cct
    md = Path(str(out) + ".md").read_text()
    assert "| FLOP budget | tome: top-1" in md and "| 0.60 |" in md
    with Image.open(str(out) + ".png") as im:
        assert im.size[0] > 600

    # the table's accuracy is the patched model's, computed directly on the same 20 images
    from visiontools.data import load_cifar, normalize
    from visiontools.models import load_default_model
    from visiontools.patches.timm import apply_tome

    model, desc = load_default_model()
    ds = load_cifar("cifar10", "test", str(datasets_dir / "cifar10"), max_per_class=2)
    x = normalize(ds.images, desc["mean"], desc["std"])
    apply_tome(model, flops=0.6, method="prune")
    assert model.tome_r == rows["prune @0.60"]["r"]
    with torch.no_grad():
        top1 = 100.0 * (model(x).argmax(1) == ds.labels).float().mean().item()
    assert rows["prune @0.60"]["top1"] == pytest.approx(top1)


def test_methods_run_at_every_r_and_bad_values_are_clear():
    assert method_settings([2], ["tome", "pitome"]) == [("pitome r=2", {"method": "pitome", "r": 2})]
    assert budget_settings([0.5], ["tofu"]) == [("tofu @0.50", {"method": "tofu", "flops": 0.5})]
    with pytest.raises(ValueError, match="unknown method 'fast'"):
        budget_settings([0.5], ["fast"])
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        budget_settings([50], ["tome"])
