#!/usr/bin/env bash
# The prepared GPU run: every GPU number the docs promise, on one CUDA GPU, with no network: `bench all`
# within --budget-s (420 s by default), then the ideal runs and the loops (several minutes more: where a
# command may run 10 minutes at most, run `--all-only` and `--ideal-only` as two commands). Writes docs/results/gpu/bench_all.{json,md} (machine named), saving after every
# measurement, so whatever finished is kept. Then `bench vit` on ViT-B/16 and ViT-L/16 (batch 256,
# r=8 and r=16) with the token-count ideal, --profile and, when a ToMe checkout is given or lies in
# .peer/ToMe (git-ignored; never commit it), the original ToMe in the same run:
# OUT/bench_vit_ideal_<model>.{json,md}. Then `bench sd` (SD 1.5 UNet at 1024² and 2048²: tomesd when installed,
# merge, downsample) and `bench dit` (Flux and SD3 blocks at 1024²) with their token-count ideal and --profile:
# OUT/bench_{sd,dit}_ideal.{json,md}. Then proportional attention on several kernels (scripts/prop_attn_kernels.py,
# ViT-B/16 shapes at batch 256): OUT/prop_attn_kernels.md. Then whole denoising loops (step caches beside ToMe: `bench sd --loop`
# at 512² and 1024², `bench dit --loop` on Flux and SD3 blocks at 1024²): OUT/bench_loops_{sd,dit}.{json,md}. Usage:
#   bash scripts/gpu_bench.sh                     # all sections, --budget-s 420, then the ViT ideal runs
#   bash scripts/gpu_bench.sh --budget-s 300      # any `visiontools bench all` option
#   bash scripts/gpu_bench.sh --sections vit --budget-s 60 --peer-tome /path/to/ToMe
#   bash scripts/gpu_bench.sh --vit-ideal-only --peer-tome .peer/ToMe   # only the ViT ideal runs
#   bash scripts/gpu_bench.sh --ideal-only        # only the ideal runs: ViT, SD, DiT (and the kernels)
#   bash scripts/gpu_bench.sh --all-only          # only `bench all`
#   bash scripts/gpu_bench.sh --ideal-only --vit-cuda-graphs   # ViT-B/16 also under torch.compile(mode="reduce-overhead")
#   bash scripts/gpu_bench.sh --smoke --out /tmp/smoke   # tiny sizes on the CPU: checks the script
# It runs from a checkout without installing it (patches/ and demos/ are put under visiontools), with
# the .venv's Python when there is one, else python3. Packages missing on the GPU machine (diffusers,
# tomesd) can travel as wheels in .whl/ (docs/benchmarks-results.md says how); without them the SD
# section records its error and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vt-site .whl/*.whl
  export PYTHONPATH="/tmp/vt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" - "$@" <<'PYCODE'
import pathlib, sys
root = pathlib.Path.cwd()
sys.path.insert(0, str(root))
import visiontools
visiontools.__path__.append(str(root))  # patches/ and demos/ import as visiontools.patches/.demos, as installed
from visiontools.cli import main

args = sys.argv[1:]
def pop(flag, value=False):
    if flag not in args:
        return None
    i = args.index(flag)
    out = args[i + 1] if value else True
    del args[i:i + (2 if value else 1)]
    return out
peer = pop("--peer-tome", value=True) or (".peer/ToMe" if (root / ".peer/ToMe/tome/patch/timm.py").is_file() else None)
vit_only, ideal_only, smoke = pop("--vit-ideal-only"), pop("--ideal-only"), "--smoke" in args
ideal_only = ideal_only or vit_only
graphs, all_only = pop("--vit-cuda-graphs"), pop("--all-only")  # compiles 3 more ViT-B variants (minutes): asked for, not by default
out = args[args.index("--out") + 1] if "--out" in args else "docs/results/gpu"
rc = 0 if ideal_only else main(["bench", "all", *([] if smoke or "--device" in args else ["--device", "cuda"]), *args])
if all_only:
    sys.exit(rc)
# the token-count ideal, the reduction step's profile and the original ToMe, per ViT (bf16 autocast on CUDA)
vits = ([("vit_tiny_patch16_224", ["--img-size", "64", "--batch-size", "2", "--repeats", "1", "--warmup", "0",
                                   "--device", "cpu", "--threads", "2"])] if smoke else
        [(m, ["--batch-size", "256", "--repeats", "10", "--warmup", "3", "--device", "cuda"])
         for m in ("vit_base_patch16_224", "vit_large_patch16_224")])
for model, opts in vits:
    name = f"{out}/bench_vit_ideal_{model}"
    opts += ["--cuda-graphs"] if graphs and not smoke and model == "vit_base_patch16_224" else []
    rc = max(rc, main(["bench", "vit", "--model", model, "--r", "8", "16", "--profile", "--no-progress", *opts,
                       *(["--peer-tome", peer] if peer else []), "--out-json", name + ".json", "--out-md", name + ".md"]))
# the token-count ideal and --profile of the diffusion models (fp16 UNet, bf16 DiT on CUDA): OUT/bench_{sd,dit}_ideal
import importlib.util
tomesd = ["tomesd@0.5"] if importlib.util.find_spec("tomesd") else []
one = ["--repeats", "1", "--warmup", "1", "--device", "cpu", "--threads", "2"]
diffusion_ideal = ([["sd", "--tiny", "--resolutions", "64", *one, "--candidates", *tomesd, "merge@0.5"],
                    ["dit", "--tiny", "--models", "flux", "--resolution", "128", *one, "--candidates", "merge@0.5"]]
                   if smoke else
                   [["sd", "--resolutions", "1024", "2048", "--repeats", "5", "--warmup", "2", "--device", "cuda",
                     "--candidates", *tomesd, "merge@0.5", "downsample@0.5"],
                    ["dit", "--models", "flux", "sd3", "--resolution", "1024", "--repeats", "5", "--warmup", "2",
                     "--device", "cuda", "--candidates", "merge@0.5", "downsample@0.5"]])
for target, *opts in ([] if vit_only else diffusion_ideal):
    name = f"{out}/bench_{target}_ideal"
    rc = max(rc, main(["bench", target, "--profile", "--no-progress", *opts, "--out-json", name + ".json",
                       "--out-md", name + ".md"]))
# proportional attention on several kernels (scripts/prop_attn_kernels.py), ViT-B/16 shapes: OUT/prop_attn_kernels.md
import contextlib, importlib.util as iu
spec = iu.spec_from_file_location("prop_attn_kernels", root / "scripts/prop_attn_kernels.py")
kernels = iu.module_from_spec(spec)
spec.loader.exec_module(kernels)
shapes = ([["--batch", "1", "--heads", "2", "--tokens", "33", "--repeats", "1", "--warmup", "0"]] if smoke else
          [["--device", "cuda", "--dtype", "bf16", "--batch", "256", "--heads", "12", "--tokens", n] for n in ("197", "133")])
if not vit_only:
    with open(f"{out}/prop_attn_kernels.md", "w") as f, contextlib.redirect_stdout(f):
        for opts in shapes:
            try:
                kernels.main(opts)
            except Exception as e:  # recorded, the other runs go on
                print(f"prop_attn_kernels {' '.join(opts)} failed: {type(e).__name__}: {e}")
                rc = max(rc, 1)
            print()
# whole denoising loops: diffusers' step caches beside ToMe, plan reuse (visiontools.bench.loops): OUT/bench_loops_*
fast = ["--repeats", "1", "--warmup", "0", "--device", "cpu", "--threads", "2", "--steps", "2",
        "--loop-candidates"]
loop_runs = ([["sd", "--tiny", "--resolutions", "64", *fast, "pab+merge@0.5:every=2"],
              ["dit", "--models", "flux", "--tiny", "--resolution", "128", *fast, "fbc+downsample@0.5"]]
             if smoke else
             [["sd", "--resolutions", "512", "1024", "--steps", "20", "--repeats", "3", "--warmup", "1",
               "--device", "cuda"],
              ["dit", "--models", "flux", "sd3", "--resolution", "1024", "--steps", "20", "--repeats", "3",
               "--warmup", "1", "--device", "cuda"]])
for target, *opts in ([] if ideal_only else loop_runs):
    name = f"{out}/bench_loops_{target}"
    rc = max(rc, main(["bench", target, "--loop", "--no-progress", *opts, "--out-json", name + ".json",
                       "--out-md", name + ".md"]))
sys.exit(rc)
PYCODE
