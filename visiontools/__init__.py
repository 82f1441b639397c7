"""visiontools: make existing vision models faster with one line, and measure it honestly."""
from __future__ import annotations

__version__ = "0.1.0"

SUPPORTED = ("timm VisionTransformer/Eva, transformers ViT/CLIP/Dinov2/SigLIP vision models, "
             "diffusers UNet2DConditionModel and SD pipelines")


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
    """Token reduction in one line: ``apply_tome(timm_vit, r=16)`` or ``apply_tome(hf_vision_model, r=16)``
    (also ``method="pitome"``, ``flops=0.5``, ...: see ``visiontools.patches.timm.apply_tome``), or
    ``apply_tome(sd_pipeline_or_unet, ratio=0.5)``; dispatches to the adapter in ``patches/``."""
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
    """Undo :func:`apply_tome`, restoring the model exactly; ``ValueError`` if it is not patched."""
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
