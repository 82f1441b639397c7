"""visiontools: make existing vision models faster with one line, and measure it honestly."""
from __future__ import annotations

__version__ = "0.1.0"


def _is_timm_vit(model) -> bool:
    try:
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, (VisionTransformer, Eva))


def _is_transformers_model(model) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)  # patched ones too


def apply_tome(model, **kwargs):
    """Token merging in one line: ``apply_tome(timm_vit, r=16)`` (or ``method="pitome"``,
    ``flops=0.5``, ...: see ``visiontools.patches.timm.apply_tome``), ``apply_tome(hf_vision_model, r=16)``
    or ``apply_tome(sd_pipeline_or_unet, ratio=0.5)``; dispatches to the adapter in ``patches/``."""
    if _is_timm_vit(model):
        from visiontools.patches.timm import apply_tome as apply
        return apply(model, **kwargs)
    if _is_transformers_model(model):
        from visiontools.patches.transformers import apply_tome as apply
        return apply(model, **kwargs)
    if type(model).__module__.startswith("diffusers.") or hasattr(model, "unet"):  # a UNet, or a pipeline
        if "r" in kwargs:
            raise TypeError("Stable Diffusion UNets and pipelines take ratio= (the fraction of tokens merged, e.g. "
                            "apply_tome(pipe, ratio=0.5)), not r= (tokens per block, for timm ViTs)")
        from visiontools.errors import require
        require("diffusers", "ToMe for Stable Diffusion")
        from visiontools.patches.diffusers import apply_tome_sd
        return apply_tome_sd(model, **kwargs)
    raise TypeError(f"no ToMe adapter for {type(model).__name__} (from {type(model).__module__}); "
                    "supported: timm VisionTransformer, transformers ViT/CLIP/Dinov2/SigLIP vision models, "
                    "diffusers UNet2DConditionModel and SD pipelines")


def remove_tome(model):
    """Undo :func:`apply_tome`, restoring the model exactly; ``ValueError`` if it is not patched."""
    if _is_timm_vit(model):
        from visiontools.patches.timm import remove_tome as remove
        return remove(model)
    if _is_transformers_model(model):
        from visiontools.patches.transformers import remove_tome as remove
        return remove(model)
    from visiontools.patches.diffusers import remove_tome_sd
    return remove_tome_sd(model)
