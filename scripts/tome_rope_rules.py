"""Compare ToMe's rules for the rotary embedding of a merged token on a trained EVA-style model.

For every r and every rule in ``visiontools.tome.merge.ROPE_RULES``: top-1 on CIFAR-10 test images, and
how far the logits move from the unpatched model's (mean absolute difference, and the share of
images whose top-1 class is unchanged). Usage (after `visiontools train --config configs/eva_cifar10_cpu.yaml`):

    python scripts/tome_rope_rules.py --checkpoint runs/eva_cifar10_cpu/last.safetensors \
        --data-dir ../shared/datasets/cifar10 --per-class 300 --threads 1 --out docs/results/eva_rope_rules
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
from tqdm.auto import tqdm

from visiontools.data import load_cifar, normalize
from visiontools.tome.merge import ROPE_RULES
from visiontools.models import load_checkpoint_model
from visiontools.patches.timm import apply_tome
from visiontools.timing import machine_description


def logits_of(model, images, mean, std, batch_size=250) -> torch.Tensor:
    """Logits for uint8 ``images`` (N, 3, H, W), in batches."""
    with torch.no_grad():
        return torch.cat([model(normalize(images[i:i + batch_size], mean, std))
                          for i in range(0, len(images), batch_size)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="visiontools checkpoint of an Eva model")
    p.add_argument("--data-dir", default="../shared/datasets/cifar10", help="CIFAR-10 ImageFolder root")
    p.add_argument("--per-class", type=int, default=300, help="test images per class")
    p.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8], help="ToMe r values")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.md and PREFIX.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, desc = load_checkpoint_model(args.checkpoint)
    ds = load_cifar("cifar10", "test", args.data_dir, max_per_class=args.per_class)
    images, labels = ds.images, ds.labels
    base = logits_of(model, images, desc["mean"], desc["std"])
    rows = [{"r": 0, "rule": "unpatched", "top1": (base.argmax(1) == labels).float().mean().item() * 100,
             "mean_abs_dlogit": 0.0, "same_top1": 100.0}]
    for r in tqdm(args.r, desc="r"):
        for rule in ROPE_RULES:
            out = logits_of(apply_tome(copy.deepcopy(model), r=r, rope_rule=rule), images, desc["mean"], desc["std"])
            rows.append({"r": r, "rule": rule, "top1": (out.argmax(1) == labels).float().mean().item() * 100,
                         "mean_abs_dlogit": (out - base).abs().mean().item(),
                         "same_top1": (out.argmax(1) == base.argmax(1)).float().mean().item() * 100})
    head = (f"{args.checkpoint} ({desc['model']}), CIFAR-10 test, {len(labels)} images; "
            f"{machine_description('cpu')}")
    lines = [head, "", "| r | rope rule | top-1 % | mean abs logit change | same top-1 as unpatched % |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {w['r']} | {w['rule']} | {w['top1']:.2f} | {w['mean_abs_dlogit']:.4f} | {w['same_top1']:.1f} |"
              for w in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"setup": head, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
