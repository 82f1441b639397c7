"""What users stack on a ToMe-patched timm or transformers ViT (docs/stacking.md): torch.compile with
fullgraph, channels_last, torchao int8 dynamic quantization, activation checkpointing, transformers'
pipelines. One test per row, tiny random-weight models (offline). Each row: the stack runs, r=0 equals the
stack without ToMe (to float rounding: the patched forward runs its own fused attention, as
tests/test_timm_patch.py states), r > 0 changes the output, remove_tome gives the stack back bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import visiontools

torch.set_num_threads(min(2, torch.get_num_threads()))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding, relative to the largest value."""
    return a.shape == b.shape and (a - b).abs().max().item() <= rel * b.abs().max().item()


def check_row(run, patch, unpatch, r=4):
    """The four checks of a matrix row: ``run()`` runs the stack (a tensor), ``patch(r)`` applies ToMe
    (re-applying replaces it), ``unpatch()`` removes it."""
    ref = run()
    assert torch.isfinite(ref).all()
    patch(0)
    assert close(run(), ref), "r=0 must equal the stack without ToMe"
    patch(r)
    out = run()
    assert out.shape == ref.shape and torch.isfinite(out).all() and not close(out, ref, 1e-3)
    unpatch()
    assert torch.equal(run(), ref), "remove_tome must restore the stack bit for bit"
    return out


def tiny_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**{**dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                                       num_classes=10), **kw}).eval()


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def timm_row(model, run, r=4):
    return check_row(run, lambda r: visiontools.apply_tome(model, r=r), lambda: visiontools.remove_tome(model), r)


# ------------------------------------------------------------------------------------------------ timm


def test_timm_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) of the model: patching, re-patching and removing after compiling all
    take effect (dynamo re-traces on the class swap), with no graph break. Dynamo's capture is what the
    patch can break; the eager backend keeps this test fast (inductor's code for the patched ViT is checked
    against eager in tests/test_timm_patch.py::test_torch_compile_matches_eager)."""
    model, x = tiny_vit(depth=2), images()
    compiled = torch.compile(model, fullgraph=True, backend="eager")

    def run():
        with torch.no_grad():
            return compiled(x)

    out = timm_row(model, run)
    visiontools.apply_tome(model, r=4)
    with torch.no_grad():
        assert torch.equal(run(), out) and close(out, model(x), 1e-5)  # compiled == eager, patched


def test_timm_channels_last():
    model, x = tiny_vit(), images().contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    assert model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad():
            return model(x)

    timm_row(model, run)


def test_timm_torchao_int8_dynamic_quantization():
    """torchao's int8 dynamic activation + int8 weight quantization of every linear (on this CPU)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model, x = tiny_vit(), images()
    with torch.no_grad():
        full = model(x)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    assert "Int8" in type(model.blocks[0].attn.qkv.weight).__name__ or \
        "Affine" in type(model.blocks[0].attn.qkv.weight).__name__

    def run():
        with torch.no_grad():
            return model(x)

    quantized = run()
    assert not torch.equal(quantized, full) and close(quantized, full, 0.2)  # quantized, and near
    timm_row(model, run)


def test_timm_activation_checkpointing():
    """set_grad_checkpointing(True) in training: the gradient of the loss with respect to the images."""
    model = tiny_vit()
    model.set_grad_checkpointing(True)
    model.train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])

    def run():
        xi = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xi), y), xi)
        return grad

    timm_row(model, run)


# -------------------------------------------------------------------------------------- transformers


def pil_images(n=3):
    from PIL import Image

    g = torch.Generator().manual_seed(2)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def scores(results) -> torch.Tensor:
    """A pipeline's per-image label scores as a tensor, in label order."""
    return torch.tensor([[d["score"] for d in sorted(res, key=lambda d: d["label"])] for res in results])


def hf_row(model, run, r=4):
    return check_row(run, lambda r: visiontools.apply_tome(model, r=r), lambda: visiontools.remove_tome(model), r)


def test_transformers_image_classification_pipeline():
    import transformers as T

    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                    intermediate_size=128, image_size=32, patch_size=4,
                                                    num_labels=5)).eval()
    processor = T.ViTImageProcessor(size={"height": 32, "width": 32})
    visiontools.apply_tome(model, r=4)  # patched before the pipeline is built, as a user would
    pipe = T.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    visiontools.remove_tome(model)
    hf_row(model, lambda: scores(pipe(pil_images(), top_k=5)))


def word_tokenizer():
    """A CLIP-style tokenizer over a few whole words (no download): start and end tokens around the words,
    padded with the end token, as CLIP's text model pools at its end token."""
    import transformers as T
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "this", "is", "a", "photo", "of", "cat", "dog", "car", "."]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                       special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", unk_token="[UNK]")
    return fast, len(vocab)


def test_transformers_zero_shot_pipeline_with_a_patched_clip():
    import transformers as T

    tokenizer, vocab = word_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=32,
                  patch_size=4)
    model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = T.pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=processor,
                      device="cpu")
    labels = ["cat", "dog", "car"]
    hf_row(model, lambda: scores(pipe(pil_images(), candidate_labels=labels)))
