"""visiontools: make existing vision models faster with one line, and measure it honestly."""
from __future__ import annotations

__version__ = "0.1.0"

SUPPORTED = ("timm VisionTransformer/Eva, transformers ViT/CLIP/Dinov2/SigLIP vision models, "
             "diffusers UNet2DConditionModel and SD pipelines, SD3/PixArt/Flux transformers and their pipelines")


def _is_timm_vit(model) -> bool:
    try:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, (VisionTransformer, Eva))


def _is_transformers_model(model) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)  # patched ones too


def _is_diffusers_model(model) -> bool:
    return any(c.__module__.startswith("diffusers.") for c in type(model).__mro__) or hasattr(model, "unet")


def _call(adapter, model, kwargs: dict, host: str):
    """``adapter(model, **kwargs)``, with a keyword the adapter does not take named in one line."""
    import inspect

    params = list(inspect.signature(adapter).parameters)[1:]  # after the model itself
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"apply_tome on a {host} ({type(model).__name__}) got unexpected keyword "
                        f"{', '.join(map(repr, unknown))}; it takes {', '.join(params)}")
    return adapter(model, **kwargs)


def apply_tome(model, **kwargs):
    """Token reduction in one line: ``apply_tome(timm_vit, r=16)``, ``apply_tome(hf_vision_model, r=16)``,
    ``apply_tome(sd_pipeline_or_unet, ratio=0.5)`` or ``apply_tome(dit_pipeline_or_transformer, ratio=0.5)``.
    Patches ``model`` in place and returns it; :func:`remove_tome` undoes it. It dispatches on the model
    to the adapter of its host, which takes the keywords below (another keyword is a ``TypeError`` that
    names the ones the host takes): timm ``VisionTransformer``/``Eva``
    (:func:`visiontools.patches.timm.apply_tome`), transformers ViT/CLIP/DINOv2/SigLIP vision models
    (:func:`visiontools.patches.transformers.apply_tome`), Stable Diffusion UNets and pipelines
    (:func:`visiontools.patches.diffusers.apply_tome_sd`) and diffusion transformers: SD3, PixArt, Flux
    (:func:`visiontools.patches.diffusers_dit.apply_tome_dit`).

    | keyword | meaning | timm | transformers | SD UNet | DiT |
    |---|---|---|---|---|---|
    | ``r`` | tokens merged per block: an int, ``(r, inflection)`` (the paper's schedule) or a per-block list | 16 | 16 | | |
    | ``ratio`` | fraction of the image tokens removed in each patched block | | | 0.5 | 0.5 |
    | ``method`` | ``"tome"``, ``"tofu"``, ``"pitome"``, or ``"prune"`` (ViTs only) | ``"tome"`` | ``"tome"`` | ``"tome"`` | ``"tome"`` |
    | ``flops`` | instead of ``r``/``ratio``: the lightest setting whose counted FLOPs are at most this fraction | None | None | None | None |
    | ``speedup`` | instead of ``r``/``ratio``: a FLOP budget of 1/``speedup`` | None | None | None | None |
    | ``calibrate`` | with ``speedup``: also time the model and merge more while the measured speedup falls short | False | False | | |
    | ``input_size`` | ``(height, width)`` at which a budget is counted and timed | model's | ``config.image_size`` | | |
    | ``calibrate_batch`` | batch of random images that ``calibrate`` times | 32 | 32 | | |
    | ``size`` | image size in pixels (int or ``(height, width)``) at which a budget is counted | | | UNet's | model's |
    | ``text_tokens`` | text tokens assumed when counting a budget | | | | ``TEXT_TOKENS`` |
    | ``prop_attn`` | proportional attention: ``log(size)`` added to the attention logits | True | True | | |
    | ``rope_rule`` | rotary models (EVA): the rotation of a merged token | ``"circular"`` | | | |
    | ``mode`` | ``"merge"`` (ToMe-SD) or ``"downsample"`` (keys/values on a smaller grid) | | | ``"merge"`` | ``"merge"`` |
    | ``max_downsample`` | patch the levels downsampled at most this much (None: the finest level with attention) | | | None | |
    | ``blocks`` | indices or names of the blocks to patch (None: all) | | | | None |
    | ``sx``, ``sy`` | destination window: one destination per ``sx`` x ``sy`` tokens | | | 2, 2 | 2, 2 |
    | ``use_rand`` | a seeded pseudo-random destination per window (else its top-left token) | | | True | True |
    | ``seed`` | seed of those destinations (with the timestep: deterministic) | | | 0 | 0 |
    | ``merge_attn`` | self-attention runs on merged tokens | | | True | |
    | ``merge_crossattn`` | cross-attention runs on merged tokens | | | False | |
    | ``merge_mlp`` | the feed-forward runs on merged tokens | | | False | False |
    | ``rope`` | Flux: the rotary position of a merged token | | | | ``"angle"`` |
    | ``downsample_method`` | ``F.interpolate`` mode, or ``"avg"``, for the downsampled grid | | | ``"nearest-exact"`` | ``"nearest-exact"`` |
    | ``similarity_dtype`` | dtype of the matching matmul (``"auto"``: bf16 where the CPU has it) | | | ``"auto"`` | ``"auto"`` |
    | ``plan_every`` | merge plans computed once every this many denoising steps, reused in between | | | 1 | 1 |

    An empty cell: the host does not take the keyword. The adapters' own entries say more."""
    if _is_timm_vit(model):
        from visiontools.patches.timm import apply_tome as apply
        return _call(apply, model, kwargs, "timm ViT")
    if _is_transformers_model(model):
        from visiontools.patches.transformers import apply_tome as apply
        return _call(apply, model, kwargs, "transformers model")
    if _is_diffusers_model(model):  # a UNet, or a pipeline
        if "r" in kwargs:
            raise TypeError("Stable Diffusion UNets and pipelines take ratio= (the fraction of tokens merged, e.g. "
                            "apply_tome(pipe, ratio=0.5)), not r= (tokens per block, for timm ViTs)")
        from visiontools.errors import require
        require("diffusers", "ToMe for Stable Diffusion")
        from visiontools.patches import diffusers_dit
        if diffusers_dit.is_dit(model):  # SD3 / PixArt / Flux transformer or pipeline
            return _call(diffusers_dit.apply_tome_dit, model, kwargs, "diffusion transformer")
        from visiontools.patches.diffusers import apply_tome_sd
        return _call(apply_tome_sd, model, kwargs, "Stable Diffusion model")
    raise TypeError(f"no ToMe adapter for {type(model).__name__} (from {type(model).__module__}); "
                    f"supported: {SUPPORTED}")


def remove_tome(model):
    """Undo :func:`apply_tome`, restoring the model exactly; ``ValueError`` if it is not patched.

    It takes no keyword on any host: ``remove_tome(model)`` dispatches like :func:`apply_tome` to
    :func:`visiontools.patches.timm.remove_tome` (timm), :func:`visiontools.patches.transformers.remove_tome`
    (transformers), :func:`visiontools.patches.diffusers.remove_tome_sd` (Stable Diffusion UNets and
    pipelines) or :func:`visiontools.patches.diffusers_dit.remove_tome_dit` (SD3, PixArt, Flux), which
    restore the original classes, processors and attributes.

    | keyword | timm | transformers | SD UNet | DiT |
    |---|---|---|---|---|
    | (none) | ``remove_tome(model)`` | ``remove_tome(model)`` | ``remove_tome(pipe_or_unet)`` | ``remove_tome(pipe_or_transformer)`` |
    """
    if _is_timm_vit(model):
        from visiontools.patches.timm import remove_tome as remove
        return remove(model)
    if _is_transformers_model(model):
        from visiontools.patches.transformers import remove_tome as remove
        return remove(model)
    if _is_diffusers_model(model):
        from visiontools.patches import diffusers_dit
        if diffusers_dit.is_dit(model):
            return diffusers_dit.remove_tome_dit(model)
        from visiontools.patches.diffusers import remove_tome_sd
        return remove_tome_sd(model)
    raise TypeError(f"remove_tome: {type(model).__name__} (from {type(model).__module__}) is not a model "
                    f"visiontools patches; supported: {SUPPORTED}")
