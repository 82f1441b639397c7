"""What training with ToMe buys: top-1 against wall-clock training time, with and without merging.

Trains one recipe (default: the ``cifar10_cct`` recipe, ``configs/cct_cifar10_cpu.yaml``, on a subset of
CIFAR-10) several times from the same initialisation, unpatched and at each ``--r``, **alternating by
epoch** (epoch 1 of every variant, then epoch 2 of every variant, ...; each continues with
``visiontools train``'s exact resume), so that load drifts of a shared machine hit all variants alike.
Each epoch's training time is the training loop alone (the record's ``seconds``; evaluation excluded);
the time axis counts every epoch of a variant at that variant's median epoch time, so that one epoch
caught by a load spike on a shared machine does not decide the comparison (the raw sums are in the table
too).
Writes a table (``OUT.md``), the records (``OUT.json``) and a plot (``OUT.png``): test top-1 at the
training setting against cumulative training minutes, and the time each variant needs to first reach
``--target`` % (and the unpatched accuracy of the merged runs, dashed). Usage:

    python scripts/tome_training_speed.py --r 8 13 --epochs 8 --train-per-class 1000 \\
        --out docs/results/cct_tome_training_speed_cpu

A killed run continues where it stopped when started again with the same arguments (``--resume``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "cct_cifar10_cpu.yaml"), help="the training recipe")
    p.add_argument("--r", nargs="+", default=["8", "13"], metavar="R",
                   help="the ToMe settings to train at (r grammar: 13, 10,-0.5, [8,8,4]); an unpatched run is "
                        "always added")
    p.add_argument("--epochs", type=int, default=8, help="epochs per variant (the cosine schedule spans them)")
    p.add_argument("--train-per-class", type=int, default=1000, help="training images per class (CIFAR-10 has 5000)")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class (CIFAR-10 has 1000)")
    p.add_argument("--target", type=float, default=None,
                   help="top-1 %% whose time to reach is reported; default: 95 %% of the unpatched run's final top-1")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--runs", default=str(ROOT / "runs" / "tome_training_speed"),
                   help="folder of the training runs (one sub-folder per variant, resumable)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --runs where they stopped")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the epochs every variant has completed in --runs")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.md, OUT.json and OUT.png")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every variant (as `visiontools train --set`)")
    return p.parse_args(argv)


def variant_configs(args) -> dict[str, dict]:
    """``{label: resolved training config}``: the recipe unpatched and at each ``--r``, same seed."""
    from visiontools.train import load_config, tome_label

    base = [f"epochs={args.epochs}", f"train_per_class={args.train_per_class}",
            f"test_per_class={args.test_per_class}", f"threads={args.threads}", "export=null", "init_from=null",
            "ema_decay=null", *args.overrides]
    cfgs = {"unpatched": load_config(args.config, [*base, f"out_dir={Path(args.runs) / 'r0'}", "tome=null"])}
    for r in args.r:
        cfg = load_config(args.config, [*base, f"out_dir={Path(args.runs) / ('r' + r.replace(',', '_'))}",
                                        f"tome.r={r}"])
        cfgs[tome_label(cfg["tome"])] = cfg
    return cfgs


def train_alternating(cfgs: dict[str, dict], epochs: int, resume: bool) -> dict[str, list[dict]]:
    """Epoch e of every variant, for e = 1..epochs; returns each variant's log."""
    from tqdm.auto import tqdm

    from visiontools.train import train

    done = {k: _epochs_done(cfg) if resume else 0 for k, cfg in cfgs.items()}
    with tqdm(total=epochs * len(cfgs), initial=sum(done.values()), desc="epochs", unit="epoch",
              file=sys.stderr) as bar:
        for epoch in range(1, epochs + 1):
            for label, cfg in cfgs.items():
                if done[label] >= epoch:
                    continue
                train(cfg, resume=done[label] > 0, overwrite=done[label] == 0, progress=False, stop_after=epoch)
                done[label] = epoch
                bar.update(1)
    return read_logs(cfgs)


def read_logs(cfgs: dict[str, dict]) -> dict[str, list[dict]]:
    """Each variant's ``log.jsonl`` (empty when it has not started)."""
    paths = {label: Path(cfg["out_dir"]) / "log.jsonl" for label, cfg in cfgs.items()}
    return {label: [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            for label, path in paths.items()}


def _epochs_done(cfg: dict) -> int:
    log = Path(cfg["out_dir"]) / "log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def accuracy_key(label: str) -> str:
    return "test_top1" if label == "unpatched" else "test_top1_tome"


def epoch_minutes(log: list[dict]) -> float:
    """A variant's median epoch time in minutes (training loop only)."""
    seconds = sorted(r["seconds"] for r in log)
    n = len(seconds)
    return (seconds[n // 2] if n % 2 else 0.5 * (seconds[n // 2 - 1] + seconds[n // 2])) / 60


def time_to(log: list[dict], key: str, target: float) -> float | None:
    """Training minutes (epochs times the median epoch time) at the end of the first epoch whose ``key``
    reaches ``target``."""
    for k, r in enumerate(log):
        if r.get(key, -1) >= target:
            return (k + 1) * epoch_minutes(log)
    return None


def table(logs: dict[str, list[dict]], target: float, machine: str, n_train: int) -> str:
    base = epoch_minutes(logs["unpatched"])
    base_t = time_to(logs["unpatched"], "test_top1", target)
    epochs = len(logs["unpatched"])
    lines = [f"Training with and without ToMe, alternating by epoch, {epochs} epochs each; {n_train} training "
             f"images per epoch; {machine}", "",
             f"| variant | median epoch min | raw sum min | speedup (median epochs) | final top-1 % (at its r) | "
             f"final top-1 % unpatched | min to {target:.1f} % | time-to-accuracy speedup |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, log in logs.items():
        total = sum(r["seconds"] for r in log) / 60
        t = time_to(log, accuracy_key(label), target)
        lines.append(f"| {label} | {epoch_minutes(log):.2f} | {total:.1f} | {base / epoch_minutes(log):.2f}x | "
                     f"{log[-1][accuracy_key(label)]:.2f} | {log[-1]['test_top1']:.2f} | "
                     f"{'not reached' if t is None else f'{t:.1f}'} | "
                     f"{'' if t is None or base_t is None else f'{base_t / t:.2f}x'} |")
    return "\n".join(lines) + "\n"


def plot(logs: dict[str, list[dict]], target: float, path: str) -> None:
    from visiontools.timing import save_figure, subplots

    fig, ax = subplots(figsize=(7, 4.2))
    for i, (label, log) in enumerate(logs.items()):
        minutes = [(k + 1) * epoch_minutes(log) for k in range(len(log))]
        ax.plot(minutes, [r[accuracy_key(label)] for r in log], "o-", color=f"C{i}",
                label=label + ("" if label == "unpatched" else " (evaluated at its r)"))
        if label != "unpatched":
            ax.plot(minutes, [r["test_top1"] for r in log], ":", color=f"C{i}", label=f"{label}, evaluated unpatched")
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="training minutes (epochs x median epoch time, training loop only)", ylabel="test top-1 %",
           title="Top-1 against training time, with and without ToMe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _relative(value):
    """A path inside the checkout as a relative path; anything else unchanged."""
    if isinstance(value, str) and value.startswith(str(ROOT)):
        return str(Path(value).relative_to(ROOT))
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from visiontools.timing import machine_description

    cfgs = variant_configs(args)
    logs = read_logs(cfgs) if args.report_only else train_alternating(cfgs, args.epochs, args.resume)
    done = min(len(log) for log in logs.values())
    if done == 0:
        raise SystemExit(f"error: no completed epochs in {args.runs}")
    logs = {label: log[:done] for label, log in logs.items()}  # whole rounds only
    final = logs["unpatched"][-1]["test_top1"]
    target = args.target if args.target is not None else round(0.95 * final, 1)
    machine = machine_description(torch.device("cpu"))
    md = table(logs, target, machine, 10 * args.train_per_class)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(md)
    shown = {k: _relative(v) for k, v in vars(args).items()}  # no build machine's absolute paths in results
    Path(args.out + ".json").write_text(json.dumps({"target": target, "machine": machine, "args": shown,
                                                    "logs": logs}, indent=1))
    plot(logs, target, args.out + ".png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
