"""Export a timm ViT or EVA, ToMe-patched or not, with ``torch.export`` and to ONNX, and check the
ONNX model in onnxruntime against PyTorch.

ToMe's token counts depend only on the number of input tokens, so an export fixes them for the
image size of the example input; the batch dimension can stay dynamic. Nothing per call lives on
the patched model, so the traced graph is the model's own forward: matching (argsort), size-weighted
merging (scatter-add) and the ``log(size)`` attention mask become ordinary graph operations.

Needs the ``export`` extra (``pip install 'visiontools[export]'``: onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import torch

from visiontools.defaults import DEFAULT_CHECKPOINT, default_r_text
from visiontools.errors import UserError

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'visiontools[export]'"


def require_onnx() -> None:
    """Raise :class:`~visiontools.errors.MissingExtraError` (an ``ImportError`` with a one-line message
    naming the fix) unless the ONNX packages are installed."""
    from visiontools.errors import MissingExtraError

    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        err = MissingExtraError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")
        err.name = missing[0]
        raise err


def example_input(model: torch.nn.Module, batch_size: int = 1, img_size=None) -> torch.Tensor:
    """A random ``(batch, 3, H, W)`` input at ``img_size`` (int or ``(H, W)``; default: the model's own)."""
    if img_size is None:
        img_size = model.patch_embed.img_size
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return torch.randn(batch_size, 3, h, w)


def token_counts(model: torch.nn.Module, x: torch.Tensor) -> list[int] | None:
    """Tokens entering each block and after the last one for inputs shaped like ``x`` (what an export
    fixes), or ``None`` for a model without ToMe."""
    from visiontools.patches.timm import ToMeVisionTransformer, tome_forward

    if not isinstance(model, ToMeVisionTransformer):
        return None
    with torch.inference_mode():
        return tome_forward(model, x[:1])[1].tokens_per_layer


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None


def _trace_input(x: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The example to trace with: a batch of 1 would be specialised to a constant, so a dynamic-batch
    export traces two images."""
    return torch.cat([x, x]) if dynamic_batch and x.shape[0] == 1 else x


def export_program(model: torch.nn.Module, x: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (eval mode) for inputs shaped like ``x``; the batch dimension
    stays dynamic unless ``dynamic_batch=False``."""
    return torch.export.export(model.eval(), (_trace_input(x, dynamic_batch),),
                               dynamic_shapes=_dynamic_shapes(dynamic_batch))


def _unfused_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose timm attention layers use the explicit (matmul, softmax) path.

    The ONNX graph is the same MatMul/Softmax either way, but PyTorch 2.14's ONNX decompositions of
    CPU fused attention with a float mask (proportional attention) produce an invalid view."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path: str | Path, dynamic_batch: bool = True,
                opset: int | None = None) -> Path:
    """Export ``model`` to an ONNX file at ``path`` with ``torch.onnx.export(..., dynamo=True)``
    (input ``pixel_values``, output ``logits``, weights inside the file). Returns the path."""
    require_onnx()
    path = Path(path)
    torch.onnx.export(_unfused_copy(model), (_trace_input(x, dynamic_batch),), str(path), dynamo=True, verbose=False, external_data=False,
                      input_names=["pixel_values"], output_names=["logits"], opset_version=opset,
                      dynamic_shapes=_dynamic_shapes(dynamic_batch))
    return path


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (``threads`` intra-op threads, default: ORT's)."""
    require_onnx()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(session, x: torch.Tensor) -> torch.Tensor:
    """Run an onnxruntime session on images ``x`` and return the logits as a tensor."""
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def max_abs_diff(model: torch.nn.Module, session, x: torch.Tensor) -> float:
    """Largest absolute difference between PyTorch's and onnxruntime's logits on ``x``."""
    with torch.inference_mode():
        ref = model.eval()(x)
    return float((onnx_logits(session, x) - ref).abs().max())


# --- command line: visiontools export ----------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools export``."""
    from visiontools.tome.r_text import r_argument

    p.add_argument("--model", default=DEFAULT_CHECKPOINT,
                   help="timm ViT or EVA name (random weights unless --pretrained), a shipped checkpoint name "
                        "(e.g. cifar10_vit) or a visiontools .safetensors checkpoint")
    p.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs a network)")
    p.add_argument("--r", type=r_argument, default=None, metavar="R",
                   help="ToMe tokens merged per block: an int (0 exports the unpatched model), 'r,inflection' "
                        "(e.g. 16,-0.5) or a comma list of per-block r; default: the checkpoint's recommended r "
                        f"(the r it was trained with, or its card's choice: {default_r_text()} for {DEFAULT_CHECKPOINT})")
    p.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention (log-size mask)")
    p.add_argument("--out", type=Path, required=True, help="the ONNX file to write (.onnx)")
    p.add_argument("--program", type=Path, default=None, metavar="PT2",
                   help="also save the torch.export ExportedProgram here (.pt2; load with torch.export.load)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="PX",
                   help="input size the export is fixed to (one value for square, or H W); default: the model's "
                        "own. ToMe's token counts follow from it")
    p.add_argument("--batch-size", type=int, default=1, help="batch of the example input used for tracing and the check")
    p.add_argument("--static-batch", action="store_true",
                   help="fix the batch dimension to --batch-size instead of leaving it dynamic")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="largest allowed |onnxruntime - PyTorch| logit difference in the check")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")


def _load(args) -> torch.nn.Module:
    from visiontools import models

    img = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    try:
        model, _ = models.load(args.model, pretrained=args.pretrained, tome=False,
                               **({} if img is None else {"img_size": img}))
    except (FileNotFoundError, ValueError) as e:  # unknown names (UserError), broken checkpoints
        raise UserError(f"cannot load --model {args.model}: {e}") from e
    return model.eval()


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad option values of ``visiontools export`` with a :class:`UserError` naming the fix,
    before any model is loaded."""
    if args.out.suffix != ".onnx":
        raise UserError(f"--out must name a .onnx file, got {args.out}: end it in .onnx")
    if not args.out.parent.is_dir():
        raise UserError(f"the folder of --out does not exist: {args.out.parent}; create it or choose another --out")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.img_size is not None and (len(args.img_size) > 2 or min(args.img_size) < 1):
        raise UserError(f"--img-size takes one or two positive sizes (square, or H W), got {args.img_size}")
    if args.opset is not None and args.opset < 7:
        raise UserError(f"--opset must be an ONNX opset number >= 7, got {args.opset} (or leave it out)")
    if not args.atol > 0:
        raise UserError(f"--atol must be > 0, got {args.atol} (or pass --no-check)")


def run(args: argparse.Namespace) -> int:
    """``visiontools export``: export a (ToMe-patched) timm ViT or EVA to ONNX and check it in onnxruntime."""
    from visiontools.tome.merge import check_r
    from visiontools.patches.timm import apply_tome

    check_arguments(args)
    if args.r is None:
        from visiontools.models import recommended_r
        args.r = recommended_r(args.model)
    check_r(args.r)
    require_onnx()
    model = _load(args)
    if not hasattr(model, "patch_embed"):
        raise UserError(f"{args.model} is a {type(model).__name__}; export supports timm ViTs and EVAs: "
                        "choose one with --model (e.g. vit_small_patch16_224 or cifar10_cct)")
    if args.r != 0:
        try:
            apply_tome(model, r=args.r, prop_attn=not args.no_prop_attn)
        except TypeError as e:
            raise UserError(f"{e}; or pass --r 0 to export the unpatched model") from e
    x = example_input(model, args.batch_size, args.img_size and (tuple(args.img_size) * 2)[:2])
    tokens = token_counts(model, x)
    dynamic = not args.static_batch
    print(f"exporting {args.model} (r={args.r}) for input {tuple(x.shape)}"
          + (", dynamic batch" if dynamic else "")
          + (f"; tokens per block: {' -> '.join(map(str, tokens))}" if tokens else ""))
    if args.program:
        torch.export.save(export_program(model, x, dynamic), str(args.program))
        print(f"wrote {args.program} (torch.export)")
    export_onnx(model, x, args.out, dynamic, args.opset)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    if not args.no_check:
        diff = max_abs_diff(model, onnx_session(args.out), x)
        print(f"onnxruntime vs PyTorch: max |logit difference| = {diff:.2e}")
        if not diff <= args.atol:
            raise UserError(f"onnxruntime's logits differ from PyTorch's by {diff:.2e} > --atol {args.atol} "
                            f"(the file {args.out} is written): raise --atol, or pass --no-check")
    return 0
