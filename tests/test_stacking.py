"""What users stack on a ToMe-patched diffusers model (docs/stacking.md): ControlNet, img2img and inpaint
pipelines, LoRA, offloading, diffusers' step caches, IP-Adapter. One test per row of the matrix, on tiny
random-weight models built from configs (offline). Every row checks the same four things
(:func:`check_row`): the stack runs, ratio 0 equals the stack without ToMe bit for bit, a ratio changes the
output, and removing ToMe gives the stack back bit for bit."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import visiontools
from visiontools.patches.diffusers import apply_tome_sd, is_patched, remove_tome_sd

torch.set_num_threads(min(2, torch.get_num_threads()))

H, W = 16, 24  # pixels of the pipelines' images; their tiny VAE downsamples x2 -> 8 x 12 latents


def check_row(run, patch, unpatch, ratio=0.5):
    """The four checks of a matrix row. ``run()`` runs the stack and returns a tensor; ``patch(ratio)``
    applies ToMe to it (re-applying replaces the patch), ``unpatch()`` removes it."""
    ref = run()
    assert torch.isfinite(ref).all()
    patch(0.0)
    assert torch.equal(run(), ref), "ratio 0 must equal the stack without ToMe bit for bit"
    patch(ratio)
    out = run()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5, f"ToMe at ratio {ratio} must change the output, a little (rel. L2 {rel:.3g})"
    unpatch()
    assert torch.equal(run(), ref), "remove_tome must restore the stack bit for bit"
    return out


def randomize_zeros(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero weight (ControlNet's zero convolutions, LoRA's B) small random values, so the
    add-on changes the output as a trained one would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def unet_config(sdxl: bool = False, **overrides) -> dict:
    """SD 1.x-like tiny UNet (attention at x1 and x2) or SDXL-like (none at x1, text_time conditioning)."""
    config = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    if sdxl:
        config.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=(2, 4, 8), use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    config.update(overrides)
    return config


def tiny_unet(seed: int = 0, sdxl: bool = False, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(sdxl, **overrides)).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32).eval()


def pipeline(cls, unet=None, sdxl: bool = False, **extra):
    """A pipeline of class ``cls`` on tiny components (no text encoders: prompts come as embeddings)."""
    from diffusers import DDIMScheduler

    parts = dict(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet or tiny_unet(sdxl=sdxl),
                 scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), **extra)
    if sdxl:
        parts.update(text_encoder_2=None, tokenizer_2=None)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(sdxl: bool = False) -> dict:
    """Prompt and negative-prompt embeddings (SDXL: with pooled embeddings), seeded."""
    g = torch.Generator().manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g),
              negative_prompt_embeds=torch.randn(1, 7, 32, generator=g))
    if sdxl:
        kw.update(pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    return kw


def image(channels: int = 3, seed: int = 2) -> torch.Tensor:
    """A smooth random image in [0, 1], ``(1, channels, H, W)``."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, channels, H // 4, W // 4, generator=g)
    return torch.nn.functional.interpolate(small, size=(H, W), mode="bilinear")


def generate(pipe, steps: int = 2, **kw) -> torch.Tensor:
    """Final latents of a seeded, guided pipeline call."""
    with torch.no_grad():
        return pipe(height=H, width=W, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kw).images


def check_pipeline(pipe, ratio=0.5, **kw):
    """:func:`check_row` on ``pipe(...)`` with ToMe applied to the pipeline (merge mode)."""
    return check_row(lambda: generate(pipe, **kw), lambda r: apply_tome_sd(pipe, ratio=r),
                     lambda: remove_tome_sd(pipe), ratio)


# ------------------------------------------------------------------------------------ UNet pipelines


def tiny_controlnet(unet):
    """A ControlNet from the UNet's layout (ControlNetModel.from_unet) with its zero convolutions
    randomised; its conditioning embedding downsamples x2, as the tiny VAE does."""
    from diffusers import ControlNetModel

    torch.manual_seed(3)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    randomize_zeros(net)
    return net


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_controlnet_pipeline(sdxl):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    unet = tiny_unet(sdxl=sdxl)
    cls = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
    pipe = pipeline(cls, unet, sdxl, controlnet=tiny_controlnet(unet))
    kw = dict(prompt(sdxl), image=image())
    uncontrolled = generate(pipe, **kw, controlnet_conditioning_scale=0.0)
    assert not torch.equal(generate(pipe, **kw), uncontrolled)  # the ControlNet acts
    merged = check_pipeline(pipe, **kw)
    # ToMe keeps acting on later calls with the ControlNet (tomesd's "ControlNet disables ToMe until reload")
    apply_tome_sd(pipe, ratio=0.5)
    assert torch.equal(generate(pipe, **kw), merged) and torch.equal(generate(pipe, **kw), merged)


def test_img2img_pipeline():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = pipeline(StableDiffusionImg2ImgPipeline)
    check_pipeline(pipe, steps=3, strength=0.7, image=image(), **prompt())


def test_inpaint_pipeline():
    """A 9-channel inpainting UNet (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = pipeline(StableDiffusionInpaintPipeline, tiny_unet(in_channels=9))
    mask = torch.zeros(1, 1, H, W)
    mask[..., H // 4:, W // 3:] = 1
    check_pipeline(pipe, image=image(), mask_image=mask, **prompt())


# ----------------------------------------------------------------------------------------------- LoRA


def lora_weights(rank: int = 4) -> dict:
    """A LoRA for :func:`tiny_unet` in the format ``load_lora_weights`` reads (``unet.``-prefixed peft
    keys), with random A and B (a trained LoRA's B is not zero)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    twin = tiny_unet()
    torch.manual_seed(4)
    twin.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(twin).items()}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("order", ["lora_first", "tome_first"])
def test_lora(order, fused):
    """LoRA loaded (and fused) before or after apply_tome_sd: the same images either way."""
    from diffusers import StableDiffusionPipeline

    lora, kw = lora_weights(), prompt()

    def add_lora(pipe):
        pipe.load_lora_weights(lora, adapter_name="style")
        if fused:
            pipe.fuse_lora()

    plain = pipeline(StableDiffusionPipeline)
    base = generate(plain, **kw)
    add_lora(plain)
    assert not torch.equal(generate(plain, **kw), base)  # the LoRA acts
    if order == "lora_first":
        merged = check_pipeline(plain, **kw)
    else:  # each run: a fresh pipeline, ToMe (setting: ratio, or None = never / "removed" = removed after LoRA)
        setting = {"ratio": None}

        def run():
            pipe = pipeline(StableDiffusionPipeline)
            if setting["ratio"] is not None:
                apply_tome_sd(pipe, ratio=setting["ratio"])
            add_lora(pipe)
            if setting.get("removed"):
                remove_tome_sd(pipe)
            return generate(pipe, **kw)

        merged = check_row(run, lambda r: setting.update(ratio=r), lambda: setting.update(removed=True))
    apply_tome_sd(plain, ratio=0.5)  # the other order gives the same images
    assert torch.equal(generate(plain, **kw), merged)


# ----------------------------------------------------------------------------------------- offloading


@pytest.mark.parametrize("order", ["offload_first", "tome_first"])
def test_model_cpu_offload(order):
    """enable_model_cpu_offload (accelerate's hooks move each model to the device for its call). No
    accelerator here: the onload device is the CPU, so this checks the hooks compose, not the transfers."""
    from diffusers import StableDiffusionPipeline

    pipe = pipeline(StableDiffusionPipeline)
    kw = prompt()
    if order == "tome_first":
        apply_tome_sd(pipe, ratio=0.5)
    pipe.enable_model_cpu_offload(device="cpu")
    if order == "tome_first":
        remove_tome_sd(pipe)
    assert pipe.unet._hf_hook is not None  # the offload hook is in place
    check_pipeline(pipe, **kw)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading(offload_type):
    """enable_group_offload on the UNet (onload and offload device: the CPU, as no accelerator is here;
    streams need CUDA)."""
    from diffusers import StableDiffusionPipeline

    pipe = pipeline(StableDiffusionPipeline)
    extra = dict(num_blocks_per_group=1) if offload_type == "block_level" else {}
    pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type=offload_type, **extra)
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    assert _is_group_offload_enabled(pipe.unet)
    check_pipeline(pipe, **prompt())


# ---------------------------------------------------------------------------------- diffusers' step caches

CACHES = ("pyramid_attention_broadcast", "first_block_cache", "faster_cache", "taylorseer_cache", "mag_cache")
TIMESTEPS = (900, 650, 400, 150)


def cache_config(name: str, clock: list):
    """A config of diffusers' cache ``name`` that skips work within :data:`TIMESTEPS` on these tiny models
    (``clock[0]``: the current timestep, for the caches that ask for it)."""
    import diffusers.hooks as dh

    now = lambda: clock[0]  # noqa: E731
    return {
        "pyramid_attention_broadcast": lambda: dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=now),
        "first_block_cache": lambda: dh.FirstBlockCacheConfig(threshold=1.0),
        "faster_cache": lambda: dh.FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 800),
            current_timestep_callback=now, attention_weight_callback=lambda module: 0.5, tensor_format="BCHW",
            is_guidance_distilled=True),
        "taylorseer_cache": lambda: dh.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "mag_cache": lambda: dh.MagCacheConfig(threshold=0.5, num_inference_steps=len(TIMESTEPS), retention_ratio=0.0,
                                               mag_ratios=[1.0] * len(TIMESTEPS)),
    }[name]()


def apply_cache(model, name: str, clock: list) -> None:
    """``model.enable_cache`` where the model has it (CacheMixin), else diffusers' ``apply_<name>``."""
    import diffusers.hooks as dh

    config = cache_config(name, clock)
    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
    else:
        getattr(dh, f"apply_{name}")(model, config)


def tiny_sd3():
    from test_diffusers_dit import tiny

    return tiny("sd3")


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()


def denoise(model, clock: list) -> torch.Tensor:
    """A short Euler-like loop over :data:`TIMESTEPS` with the model (a UNet or a Flux transformer), cache
    state reset first and each call in a cache context, as a pipeline runs it; the final latents."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    g = torch.Generator().manual_seed(5)
    flux = not hasattr(model, "up_blocks")
    h, w = 8, 12
    x = torch.nn.functional.interpolate(torch.randn(1, 16 if flux else 4, 4, 6, generator=g), size=(h, w),
                                        mode="bilinear")
    text = torch.randn(1, 5, 16 if flux else 32, generator=g)
    if flux:
        ids = torch.zeros(h, w, 3)
        ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
        x = x.flatten(2).transpose(1, 2)
        extra = dict(pooled_projections=torch.randn(1, 8, generator=g), img_ids=ids.reshape(-1, 3),
                     txt_ids=torch.zeros(5, 3))
    for t in TIMESTEPS:
        clock[0] = t
        context = model.cache_context("cond") if hasattr(model, "cache_context") else contextlib.nullcontext()
        with torch.no_grad(), context:
            if flux:
                out = model(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((1,), t / 1000),
                            **extra).sample
            else:
                out = model(x, torch.tensor(t), text).sample
        x = x - 0.15 * out
    return x


def check_cache_row(model, name: str):
    clock = [0]
    bare = denoise(model, clock)
    apply_cache(model, name, clock)
    assert not torch.equal(denoise(model, clock), bare), f"{name} must skip work (change the output) here"
    check_row(lambda: denoise(model, clock), lambda r: visiontools.apply_tome(model, ratio=r),
              lambda: visiontools.remove_tome(model))


@pytest.mark.parametrize("name", CACHES)
def test_step_cache_on_a_dit(name):
    """Each of diffusers' caches on a Flux transformer (``enable_cache``), ToMe on top of it."""
    check_cache_row(tiny_flux(), name)


def test_step_cache_on_a_unet():
    """Pyramid attention broadcast on a UNet (its attention modules match the cache's identifiers)."""
    check_cache_row(tiny_unet(), "pyramid_attention_broadcast")


def test_diffusers_applies_its_other_caches_to_no_unet_module():
    """What the matrix says of UNets: diffusers' first-block cache finds no block list on a UNet (it fails
    inside diffusers); the other caches match none of a UNet's modules, so they change nothing. When a
    diffusers release changes this, this test fails and the matrix must be updated."""
    clock = [0]
    bare = denoise(tiny_unet(), clock)
    with pytest.raises(IndexError):
        apply_cache(tiny_unet(), "first_block_cache", clock)
    for name in ("faster_cache", "taylorseer_cache", "mag_cache"):
        unet = tiny_unet()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_cache(unet, name, clock)
        assert torch.equal(denoise(unet, clock), bare), name


# ------------------------------------------------------------------------------------------- IP-Adapter

CLIP_DIM = 16  # width of the (never built) image encoder's embeddings


def ip_adapter_weights(unet) -> dict:
    """A random IP-Adapter for ``unet`` in the layout ``_load_ip_adapter_weights`` reads (what
    ``load_ip_adapter`` hands it from a file): the image projection and each cross-attention's ip k/v."""
    g = torch.Generator().manual_seed(6)
    cross, widths = unet.config.cross_attention_dim, unet.config.block_out_channels
    proj = {"proj.weight": torch.randn(4 * cross, CLIP_DIM, generator=g) * 0.3, "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        where, level = name.split(".")[0], name.split(".")[1]
        width = widths[-1] if where == "mid_block" else widths[int(level)] if where == "down_blocks" \
            else widths[::-1][int(level)]
        for kv in ("k", "v"):
            ip[f"{key}.to_{kv}_ip.weight"] = torch.randn(width, cross, generator=g) * 0.3
        key += 2
    return {"image_proj": proj, "ip_adapter": ip}


@pytest.mark.parametrize("merge_crossattn", [False, True])
def test_ip_adapter_on_a_unet(merge_crossattn):
    """IP-Adapter loaded, then ToMe (with merged queries in the IP-Adapter's cross-attention too, if asked)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = pipeline(StableDiffusionPipeline)
    kw = prompt()
    base = generate(pipe, **kw)
    pipe.unet._load_ip_adapter_weights([ip_adapter_weights(pipe.unet)])
    assert any(isinstance(p, IPAdapterAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    g = torch.Generator().manual_seed(7)
    kw["ip_adapter_image_embeds"] = [torch.randn(2, 1, CLIP_DIM, generator=g)]  # (negative, positive) image
    assert not torch.equal(generate(pipe, **kw), base)  # the image prompt acts
    check_row(lambda: generate(pipe, **kw), lambda r: apply_tome_sd(pipe, ratio=r, merge_crossattn=merge_crossattn),
              lambda: remove_tome_sd(pipe))


def test_ip_adapter_masks_on_a_unet_reach_the_adapter_under_tome():
    """IP-Adapter masks (``cross_attention_kwargs``) reach the IP-Adapter's processor under ToMe: ratio 0 is
    exact; with ``merge_crossattn=True`` a masked call's cross-attention runs unmerged (the processor fits the
    mask to the query grid, which merged queries do not form), so it equals ``merge_crossattn=False``."""
    from diffusers import StableDiffusionPipeline

    pipe = pipeline(StableDiffusionPipeline)
    pipe.unet._load_ip_adapter_weights([ip_adapter_weights(pipe.unet)])
    g = torch.Generator().manual_seed(7)
    kw = dict(prompt(), ip_adapter_image_embeds=[torch.randn(2, 1, CLIP_DIM, generator=g)])
    unmasked = generate(pipe, **kw)
    mask = torch.zeros(1, 1, H, W)
    mask[..., :, : W // 2] = 1
    kw["cross_attention_kwargs"] = {"ip_adapter_masks": [mask]}
    ref = generate(pipe, **kw)
    assert not torch.equal(ref, unmasked)  # the mask acts
    apply_tome_sd(pipe, ratio=0.0, merge_crossattn=True)
    assert torch.equal(generate(pipe, **kw), ref)
    apply_tome_sd(pipe, ratio=0.5)
    self_only = generate(pipe, **kw)
    assert not torch.equal(self_only, ref)
    apply_tome_sd(pipe, ratio=0.5, merge_crossattn=True)
    assert torch.equal(generate(pipe, **kw), self_only)


def test_ip_adapter_loaded_after_tome_is_refused_in_one_line():
    """diffusers re-creates every processor as ``type(processor)()`` when it loads an IP-Adapter: a ToMe
    processor refuses, naming the order that works; that order works."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    unet = tiny_unet()
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True)
    with pytest.raises(TypeError, match=r"^ToMe's attention processors cannot be re-created .*call "
                                        r"remove_tome\(pipe\), load the adapter, then apply_tome"):
        unet._load_ip_adapter_weights([ip_adapter_weights(unet)])
    remove_tome_sd(unet)
    unet._load_ip_adapter_weights([ip_adapter_weights(unet)])
    apply_tome_sd(unet, ratio=0.5, merge_crossattn=True)
    assert is_patched(unet) and any(isinstance(p, IPAdapterAttnProcessor2_0) for p in unet.attn_processors.values())


def flux_ip_weights(model) -> dict:
    """A random IP-Adapter for a Flux transformer in the layout its ``_load_ip_adapter_weights`` reads:
    the image projection (4 tokens) and each double-stream block's ip k/v."""
    g = torch.Generator().manual_seed(6)
    cross, hidden = model.config.joint_attention_dim, model.inner_dim
    proj = {"proj.weight": torch.randn(4 * cross, CLIP_DIM, generator=g) * 0.3, "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip = {}
    for i in range(len(model.transformer_blocks)):
        for kv in "kv":
            ip[f"{i}.to_{kv}_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            ip[f"{i}.to_{kv}_ip.bias"] = torch.randn(hidden, generator=g) * 0.1
    return {"image_proj": proj, "ip_adapter": ip}


def sd3_ip_weights(model) -> dict:
    """A random IP-Adapter for an SD3 transformer in the layout its ``_load_ip_adapter_weights`` reads: the
    timestep-aware resampler and each attention's adapter (norms, ip k/v), from freshly built modules."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(6)
    width = model.config.attention_head_dim * model.config.num_attention_heads
    proj = IPAdapterTimeImageProjection(embed_dim=CLIP_DIM, output_dim=width, hidden_dim=64, heads=1, num_queries=4,
                                        timestep_in_dim=32)
    ip = {}
    for i, _ in enumerate(model.attn_processors):
        proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=width, ip_hidden_states_dim=width,
                                                 head_dim=model.config.attention_head_dim, timesteps_emb_dim=64)
        ip.update({f"{i}.{k}": v for k, v in proc.state_dict().items()})
    return {"image_proj": proj.state_dict(), "ip_adapter": ip}


def load_dit_ip_adapter(model) -> None:
    """Load a random IP-Adapter into a tiny Flux or SD3 transformer as diffusers' loader does."""
    flux = type(model).__name__ == "FluxTransformer2DModel"
    model._load_ip_adapter_weights([flux_ip_weights(model)] if flux else sd3_ip_weights(model))


def dit_image_prompt(kind: str, seed: int = 7) -> dict:
    """The pipeline's image-prompt embeddings (Flux: positive and negative; SD3: negative and positive stacked)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "flux":
        return dict(ip_adapter_image_embeds=[torch.randn(1, 1, CLIP_DIM, generator=g)],
                    negative_ip_adapter_image_embeds=[torch.randn(1, 1, CLIP_DIM, generator=g)])
    return dict(ip_adapter_image_embeds=torch.randn(2, 1, CLIP_DIM, generator=g))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["merge", "downsample"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_ip_adapter_on_flux_and_sd3(kind, mode):
    """IP-Adapter loaded into an SD3 / Flux pipeline, then ToMe: ToMe wraps their IP-Adapter processors and
    runs the image-prompt attention too (the output stays near the IP-Adapter's, far from the output without
    the image prompt), and the adapter's weights stay in the model while patched."""
    from test_diffusers_dit import tiny_pipeline

    pipe, kw = tiny_pipeline(kind)

    def generate_dit(**extra):
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(0), **kw, **extra).images

    without = generate_dit()
    load_dit_ip_adapter(pipe.transformer)
    keys, prompt_a, prompt_b = list(pipe.transformer.state_dict()), dit_image_prompt(kind), dit_image_prompt(kind, 8)
    ref = generate_dit(**prompt_a)
    assert rel_l2(ref, without) > 0.05  # the image prompt acts
    out = check_row(lambda: generate_dit(**prompt_a), lambda r: visiontools.apply_tome(pipe, ratio=r, mode=mode),
                    lambda: visiontools.remove_tome(pipe))
    assert rel_l2(out, ref) < 0.5 * rel_l2(out, without)  # ToMe keeps the image prompt's effect
    visiontools.apply_tome(pipe, ratio=0.5, mode=mode)
    assert list(pipe.transformer.state_dict()) == keys
    assert not torch.equal(generate_dit(**prompt_b), out)  # another image prompt, another image


def test_ip_adapter_loaded_after_tome_on_flux_and_sd3():
    """Flux's loader re-creates the single-stream processors as ``type(processor)()``: refused in one line, the
    patch left as it was. SD3's replaces every processor: the next call warns once that those attentions run
    without ToMe, and applying ToMe again wraps the IP-Adapter's processors."""
    from test_diffusers_dit import inputs, run

    flux = tiny_flux()
    visiontools.apply_tome(flux, ratio=0.5)
    procs = dict(flux.attn_processors)
    with pytest.raises(TypeError, match=r"^ToMe's attention processors cannot be re-created .*call "
                                        r"remove_tome\(pipe\), load the adapter, then apply_tome"):
        load_dit_ip_adapter(flux)
    assert dict(flux.attn_processors) == procs
    sd3 = tiny_sd3()
    visiontools.apply_tome(sd3, ratio=0.5)
    load_dit_ip_adapter(sd3)
    with pytest.warns(UserWarning, match=r"^ToMe: 2 of 2 patched attention processors were replaced after "
                                         r"apply_tome; .* Call apply_tome again"):
        run(sd3, inputs("sd3"))
    visiontools.apply_tome(sd3, ratio=0.5)
    kinds = {type(sd3.transformer_blocks[i].attn.processor).__name__ for i in range(2)}
    assert kinds == {"ToMeDiTIPAdapterAttnProcessor"}


def attention_inputs(model, h: int, w: int, seed: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    x = torch.nn.functional.interpolate(torch.randn(2, width, 3, 3, generator=g), size=(h, w), mode="bilinear")
    return dict(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=torch.randn(2, 5, width, generator=g))


def test_ip_adapter_attention_on_flux_and_sd3_is_theirs_on_the_reduced_tokens():
    """One patched attention against diffusers' IP-Adapter processor. SD3, merge mode: ToMe's output is theirs
    run on the merged image tokens, unmerged. Flux, merge and downsample mode: the image-prompt output
    (returned third) is theirs, for every image token, while the attention output differs."""
    from visiontools.tome import merge2d

    h, w = 4, 6
    sd3 = tiny_sd3()
    load_dit_ip_adapter(sd3)
    visiontools.apply_tome(sd3, ratio=0.5)
    attn, g = sd3.transformer_blocks[0].attn, torch.Generator().manual_seed(10)
    proc, kw = attn.processor, attention_inputs(sd3, h, w)
    ip = dict(ip_hidden_states=torch.randn(2, 4, 16, generator=g), temb=torch.randn(2, 64, generator=g))
    proc.state.ctx.hw = (h, w)
    proc.slot.plan = plan = merge2d.plan_merge_2d(kw["hidden_states"], h, w, 12, seed=0)
    with torch.no_grad():
        ours = attn(**kw, **ip)
        theirs = proc.inner(attn, merge2d.merge_2d(plan, kw["hidden_states"]), kw["encoder_hidden_states"], **ip)
    torch.testing.assert_close(ours[0], merge2d.unmerge(theirs[0], plan.index), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)

    flux = tiny_flux()
    load_dit_ip_adapter(flux)
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    rope = flux.pos_embed(torch.cat([torch.zeros(5, 3), ids.reshape(-1, 3)]))
    ip = dict(ip_hidden_states=[torch.randn(2, 1, 4, 16, generator=g)])
    for mode in ("merge", "downsample"):
        visiontools.apply_tome(flux, ratio=0.5, mode=mode)
        attn = flux.transformer_blocks[0].attn
        proc, kw = attn.processor, attention_inputs(flux, h, w)
        proc.state.ctx.hw = (h, w)
        proc.slot.plan = merge2d.plan_merge_2d(kw["hidden_states"], h, w, 12, seed=0)
        with torch.no_grad():
            ours = attn(**kw, image_rotary_emb=rope, **ip)
            theirs = proc.inner(attn, kw["hidden_states"], kw["encoder_hidden_states"], None, rope, **ip)
        assert len(ours) == 3 and ours[2].abs().max() > 0
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-6)
        assert rel_l2(ours[0], theirs[0]) > 1e-3, mode


@pytest.mark.parametrize("kind", ["unet", "flux", "sd3"])
def test_ip_adapter_weights_stay_in_the_patched_model(kind):
    """diffusers keeps an IP-Adapter's processor (an nn.Module with the adapter's weights) as a submodule of
    its attention; ToMe's processor around it shares those weights under the same names, so state_dict(),
    .to() and .double() reach them while patched (the model runs in float64), and removal gives back theirs."""
    if kind == "unet":
        model = tiny_unet()
        model._load_ip_adapter_weights([ip_adapter_weights(model)])
    else:
        model = tiny_flux() if kind == "flux" else tiny_sd3()
        load_dit_ip_adapter(model)
    procs, state = dict(model.attn_processors), model.state_dict()
    visiontools.apply_tome(model, ratio=0.5, **({"merge_crossattn": True} if kind == "unet" else {}))
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    if kind == "unet":
        with torch.no_grad():
            model(torch.randn(1, 4, 8, 12, dtype=torch.float64), torch.tensor(500), torch.randn(1, 5, 32).double(),
                  added_cond_kwargs={"image_embeds": [torch.randn(1, 1, CLIP_DIM).double()]})
    visiontools.remove_tome(model)
    assert all(p is procs[n] for n, p in model.attn_processors.items())
    adapter = [w for p in procs.values() if isinstance(p, torch.nn.Module) for w in p.parameters()]
    assert adapter and {w.dtype for w in adapter} == {torch.float64}  # .double() reached their own weights


# ------------------------------------------------------------------------------- merge plans across steps


def count_plans(monkeypatch) -> list:
    """Record the token count of every merge plan computed from now on."""
    from visiontools.tome import merge2d

    calls, plan = [], merge2d.plan_merge_2d

    def counting(x, *args, **kw):
        calls.append(x.shape[1])
        return plan(x, *args, **kw)

    monkeypatch.setattr(merge2d, "plan_merge_2d", counting)
    return calls


@pytest.mark.parametrize("kind", ["unet", "flux"])
def test_plan_every_reuses_merge_plans_between_planning_steps(kind, monkeypatch):
    """plan_every=1 is today's behaviour bit for bit (a plan per block per step); plan_every=2 plans at steps
    0 and 2 of 4 and reuses those indices at steps 1 and 3 (a close, different result); a new loop (the
    timestep going up again) plans afresh."""
    model = tiny_unet() if kind == "unet" else tiny_flux()
    clock, calls = [0], count_plans(monkeypatch)
    visiontools.apply_tome(model, ratio=0.5)
    blocks = len(model._visiontools_tome_sd.slots if kind == "unet" else model._visiontools_tome_dit.slots)
    default = denoise(model, clock)
    assert len(calls) == len(TIMESTEPS) * blocks
    visiontools.apply_tome(model, ratio=0.5, plan_every=1)
    assert torch.equal(denoise(model, clock), default)
    visiontools.apply_tome(model, ratio=0.5, plan_every=2)
    calls.clear()
    reused = denoise(model, clock)
    assert len(calls) == 2 * blocks  # steps 0 and 2 of 4
    rel = ((reused - default).norm() / default.norm()).item()
    assert 0 < rel < 0.2
    assert torch.equal(denoise(model, clock), reused) and len(calls) == 4 * blocks  # a new loop plans at its step 0
    visiontools.apply_tome(model, ratio=0.5, plan_every=len(TIMESTEPS))
    calls.clear()
    denoise(model, clock)
    assert len(calls) == blocks


def test_plan_every_replans_when_the_tokens_change_and_is_checked(monkeypatch):
    unet, calls = tiny_unet(), count_plans(monkeypatch)
    apply_tome_sd(unet, ratio=0.5, plan_every=3)
    e = torch.randn(1, 5, 32)
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 12), torch.tensor(900), e)
        unet(torch.randn(1, 4, 10, 12), torch.tensor(800), e)  # another size: a plan of its own
        unet(torch.randn(1, 4, 10, 12), torch.tensor(700), e)  # same size as the last: reused
    assert calls == [96] * 3 + [120] * 3  # its 3 patched blocks plan at the first two calls only
    for bad, match in ((0, "plan_every must be an integer >= 1, got 0"), (1.5, "plan_every must be an integer")):
        with pytest.raises(ValueError, match=match):
            apply_tome_sd(unet, ratio=0.5, plan_every=bad)
    with pytest.raises(ValueError, match=r"^plan_every applies to mode='merge' only"):
        apply_tome_sd(unet, ratio=0.5, mode="downsample", plan_every=2)


# ------------------------------------------------------------------------------------------- loop benchmark


def test_bench_loops_sd_and_dit_tiny(tmp_path):
    """``bench sd --loop`` / ``bench dit --loop``: whole loops per candidate, one row each; the unpatched row
    is the reference; a bad candidate is one line."""
    import argparse
    import json

    from visiontools.bench import dit as bench_dit
    from visiontools.bench import loops
    from visiontools.bench import sd as bench_sd
    from visiontools.errors import UserError

    common = ["--loop", "--tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--no-progress"]
    for module, extra, cands in ((bench_sd, ["--resolutions", "64"], ["pab+merge@0.5:every=2", "downsample@0.75"]),
                                 (bench_dit, ["--models", "flux", "--resolution", "128"], ["fbc+merge@0.5", "mag"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        out = tmp_path / f"{module.__name__}.json"
        args = parser.parse_args([*common, *extra, "--loop-candidates", *cands, "--out-json", str(out)])
        assert module.run(args) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [r["candidate"] for r in rows] == ["unpatched", *cands]
        assert rows[0]["rel_l2"] == 0 and rows[0]["speedup"] == 1
        assert all(0 < r["rel_l2"] < 1 and r["median_s"] > 0 and r["steps"] == 2 for r in rows[1:])
    assert loops.parse_candidate("mag+merge@0.5:every=3") == (["mag"], {"mode": "merge", "ratio": 0.5, "plan_every": 3})
    with pytest.raises(UserError, match=r"^--loop-candidates: bad part 'tome@0.5' in 'pab\+tome@0.5'; parts are"):
        loops.parse_candidate("pab+tome@0.5")
