"""Unit tests of the functions behind the demo's components (demos/*.py): image reading and its
error messages, the merge analysis, predictions, the model cache, the speed measurement and the
Gradio callbacks. Real bundled photos, the default (shipped) model, tiny settings."""
from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visiontools.demos.images import ImageInputError, example_images, read_image, square_crop
from visiontools.demos.merging import analyse, model_input, r_setting, token_table, top_k
from visiontools.demos.model_cache import ModelCache, load_model
from visiontools.models import DEFAULT_CHECKPOINT

CAT = next(p for p in example_images() if p.endswith("cat.jpg"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dm():
    """The shipped plain ViT (a class token, 65 tokens): the merge view's tests count its tokens. The
    default checkpoint has its own tests below."""
    return ModelCache(allow_download=False).get("cifar10_vit")


@pytest.fixture(scope="module")
def cat():
    return read_image(CAT)[0]


# --- bundled images -------------------------------------------------------------------------------

def test_bundled_examples_are_small_real_jpegs_with_credits():
    paths = example_images()
    assert len(paths) >= 3
    for p in paths:
        assert Path(p).stat().st_size <= 100_000
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 200
            assert np.asarray(im).std() > 20  # a photo, not a flat placeholder
    credits = (Path(paths[0]).parent / "CREDITS.md").read_text()
    assert all(Path(p).name in credits for p in paths)


# --- reading uploads ------------------------------------------------------------------------------

def test_read_image_keeps_rgb_photo(cat):
    with Image.open(CAT) as orig:
        assert cat.mode == "RGB" and cat.size == orig.size
        assert np.array_equal(np.asarray(cat), np.asarray(orig.convert("RGB")))


def test_greyscale_upload_becomes_rgb_with_note(tmp_path, cat):
    p = tmp_path / "grey.png"
    cat.convert("L").save(p)
    im, notes = read_image(str(p))
    a = np.asarray(im)
    assert im.mode == "RGB" and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
    assert any("greyscale" in n for n in notes)


def test_16bit_greyscale_upload_is_rescaled(tmp_path, cat):
    a16 = (np.asarray(cat.convert("L"), dtype=np.uint16) * 257)
    p = tmp_path / "grey16.png"
    Image.fromarray(a16).save(p)
    im, notes = read_image(str(p))
    a = np.asarray(im)
    assert im.mode == "RGB" and a.max() == 255 and a.min() == 0
    assert any("8 bits" in n for n in notes)


def test_rgba_upload_is_composited_on_white(tmp_path, cat):
    rgba = cat.convert("RGBA")
    alpha = np.full(cat.size[::-1], 255, np.uint8)
    alpha[:, : cat.size[0] // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    p = tmp_path / "rgba.png"
    rgba.save(p)
    im, notes = read_image(str(p))
    a = np.asarray(im)
    assert im.mode == "RGB"
    assert (a[:, : cat.size[0] // 2] == 255).all()
    assert np.array_equal(a[:, cat.size[0] // 2:], np.asarray(cat)[:, cat.size[0] // 2:])
    assert any("alpha" in n for n in notes)


def test_not_an_image_gives_clear_message(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is a text file, not a photo\n")
    with pytest.raises(ImageInputError, match="not an image file"):
        read_image(str(p))


def test_truncated_jpeg_gives_clear_message(tmp_path):
    data = Path(CAT).read_bytes()
    p = tmp_path / "truncated.jpg"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageInputError, match="damaged or truncated"):
        read_image(str(p))


def test_the_40_megapixel_limit_itself(tmp_path):
    """The real limit, unpatched: exactly 40 MP is read (JPEG draft decoding keeps it cheap), one
    row more is refused from the header, before decoding."""
    at_limit, over = tmp_path / "at_limit.jpg", tmp_path / "over.jpg"
    Image.new("L", (8000, 5000), 128).save(at_limit, quality=50)
    Image.new("L", (8000, 5001), 128).save(over, quality=50)
    im, notes = read_image(str(at_limit))
    assert im.mode == "RGB" and max(im.size) == 1024 and any("downscaled" in n for n in notes)
    with pytest.raises(ImageInputError, match=r"8000x5001 = 40 megapixels \(the limit is 40 megapixels\)"):
        read_image(str(over))


def test_large_image_is_downscaled(monkeypatch):
    import visiontools.demos.images as images

    monkeypatch.setattr(images, "WORK_SIDE", 100)
    im, notes = read_image(CAT)
    assert max(im.size) == 100 and any("downscaled" in n for n in notes)


def test_missing_and_empty_inputs():
    with pytest.raises(ImageInputError, match="No image"):
        read_image(None)
    with pytest.raises(ImageInputError, match="could not be found"):
        read_image("/nonexistent/upload.png")


def test_square_crop_is_centred(cat):
    sq = square_crop(cat)
    w, h = cat.size
    assert sq.size == (h, h)
    off = (w - h) // 2
    assert np.array_equal(np.asarray(sq), np.asarray(cat)[:, off:off + h])


# --- merge analysis -------------------------------------------------------------------------------

def test_r_setting_schedules():
    assert r_setting(8) == 8
    assert r_setting(8.0, "decreasing") == (8, -0.5)
    assert r_setting(8, "increasing") == (8, 0.5)
    with pytest.raises(ValueError, match="schedule"):
        r_setting(8, "sideways")
    with pytest.raises(ValueError, match="r must be >= 0"):
        r_setting(-1)
    with pytest.raises(ValueError, match="non-negative integer"):
        r_setting(2.5)


def test_r_setting_reads_the_schedules_with_the_command_lines_grammar(monkeypatch):
    """The demo's schedule names are `--r` texts read by parse_r_text (the one grammar)."""
    import visiontools.demos.merging as merging

    from visiontools.tome.r_text import parse_r_text

    assert all(r_setting(8, name) == parse_r_text(text.format(r=8)) for name, text in merging.SCHEDULES.items())
    monkeypatch.setitem(merging.SCHEDULES, "per-layer", "{r},{r},0")
    assert r_setting(4, "per-layer") == [4, 4, 0]


def test_model_input_normalises_with_model_stats(dm):
    grey = Image.new("RGB", (50, 40), (128, 64, 255))
    x = model_input(dm, grey)
    assert x.shape == (1, 3, *dm.input_size)
    want = (torch.tensor([128, 64, 255]) / 255 - torch.tensor(dm.mean)) / torch.tensor(dm.std)
    assert torch.allclose(x[0, :, 3, 5], want.float(), atol=1e-5)


def test_top_k_orders_classes_by_probability():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0, 0.5]])
    out = top_k(logits, list("abcdef"), k=3)
    assert list(out) == ["b", "d", "c"]
    p = logits.softmax(-1)[0]
    assert out["b"] == pytest.approx(float(p[1]))


def test_token_table():
    assert token_table([65, 57, 50, 50]) == [[1, 65, 8, 57], [2, 57, 7, 50], [3, 50, 0, 50]]


def test_analyse_counts_tokens_and_groups(dm, cat):
    r = 4
    res = analyse(dm, cat, r)
    n0 = dm.num_patches + dm.model.num_prefix_tokens
    assert res.tokens_per_layer == [n0 - r * i for i in range(dm.depth + 1)]
    # the picture: the same model on a 2x larger copy (16x16 patches), every block's r times 4
    assert dm.picture_grid == (16, 16) and res.scale == 2 and res.picture_r == [4 * r] * dm.depth
    assert res.layer == dm.depth and res.groups == 16 * 16 - 4 * r * dm.depth
    assert res.visualisation.size == (384, 384) and res.visualisation.mode == "RGB"
    assert len(res.before) == 5 and len(res.after) == 5
    assert set(res.before) <= set(dm.classes)
    mid = analyse(dm, cat, r, layer=2)
    assert mid.groups == 16 * 16 - 2 * 4 * r
    assert "patch groups after block" in res.summary(dm, r, "constant")


def test_analyse_layer_zero_and_r_zero(dm, cat):
    from visiontools.tome.vis import render_merges

    res = analyse(dm, cat, 0, layer=0)
    assert res.groups == 16 * 16
    view = square_crop(cat).resize((384, 384), Image.Resampling.BICUBIC)
    want = render_merges(view, torch.arange(16 * 16), grid_size=(16, 16))
    assert np.array_equal(np.asarray(res.visualisation), np.asarray(want))
    # r=0: the patched model computes what the unpatched one does
    for k, v in res.before.items():
        assert res.after[k] == pytest.approx(v, abs=1e-4)
    with pytest.raises(ValueError, match="layer must be between"):
        analyse(dm, cat, 4, layer=dm.depth + 1)


def test_summary_wording_follows_the_model_and_says_when_nothing_merges(dm, cat):
    """The summary counts tokens as bench and eval do ("65 -> 49"), says "class token included" only for a
    model with one (cifar10_vit) and "no class token" for one without (conformer_cifar10), and at r=0
    says that nothing is merged instead of "the last block sees 65 instead of 65"."""
    from visiontools.demos.merge_tab import model_info_markdown

    text = analyse(dm, cat, 4).summary(dm, 4, "constant")
    assert "Tokens (class token included): 65 -> 45 (entering the first -> the last block)" in text, text
    assert "per block: 65 -> 61 -> 57 -> 53 -> 49 -> 45 -> 41" in text and "Nothing" not in text, text
    text = analyse(dm, cat, 0).summary(dm, 0, "constant")
    assert "Nothing is merged at this setting: every block sees all 65 tokens (class token included)" in text, text
    assert "instead of" not in text and "->" not in text
    assert "class token included" in model_info_markdown(dm) and "class token(s)" not in model_info_markdown(dm)

    conformer = ModelCache(allow_download=False).get("conformer_cifar10")  # no class token
    text = analyse(conformer, cat, 4).summary(conformer, 4, "constant")
    assert "Tokens (no class token: patch tokens only): 64 -> " in text and "class token included" not in text, text
    text = analyse(conformer, cat, 0).summary(conformer, 0, "constant")
    assert "every block sees all 64 tokens (no class token: patch tokens only)" in text, text
    assert "no class token" in model_info_markdown(conformer) and "included" not in model_info_markdown(conformer)


def test_opacity_blends_drawing_with_photo(dm, cat):
    full = analyse(dm, cat, 4, layer=3)
    half = analyse(dm, cat, 4, layer=3, opacity=0.5)
    view = np.asarray(square_crop(cat).resize((384, 384), Image.Resampling.BICUBIC), dtype=np.float64)
    want = 0.5 * view + 0.5 * np.asarray(full.visualisation, dtype=np.float64)
    assert np.abs(np.asarray(half.visualisation, dtype=np.float64) - want).max() <= 1.0
    with pytest.raises(ValueError, match="opacity"):
        analyse(dm, cat, 4, opacity=1.5)


def test_decreasing_schedule_merges_more_early(dm, cat):
    res = analyse(dm, cat, 4, "decreasing")
    merged = [row[2] for row in res.table]
    assert merged[0] > merged[-1]


def test_concurrent_requests_do_not_share_settings(dm, cat):
    """Requests patch their own shallow copy; the cached model stays unpatched."""
    results, errors = {}, []

    def work(r):
        try:
            results[r] = analyse(dm, cat, r).tokens_per_layer
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1, 3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    n0 = dm.num_patches + dm.model.num_prefix_tokens
    for r, tokens in results.items():
        assert tokens[1] == n0 - r
    assert not hasattr(dm.model, "tome_r")
    assert type(dm.model).__name__ == "VisionTransformer"


# --- model cache ----------------------------------------------------------------------------------

def test_cache_loads_each_model_once_across_threads():
    cache = ModelCache(allow_download=False)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("default"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.loads == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert cache.get(DEFAULT_CHECKPOINT) is got[0] and cache.get("") is got[0]  # the default's aliases


def test_start_up_model_named_by_alias_is_never_evicted_and_failed_loads_leave_no_lock():
    cache = ModelCache(allow_download=False, max_cached=0, default=DEFAULT_CHECKPOINT)
    start = cache.get(None)
    cache.get("vit_tiny_patch16_224")  # over max_cached: evicted again, but not the start-up model
    assert cache.get("default") is start and cache.loads == 2
    with pytest.raises(ValueError, match="cannot be used in this demo"):
        cache.get("resnet18")
    assert not cache._loading  # the failed name's load lock is gone


def test_default_model_is_the_librarys_default_checkpoint():
    """The demo opens on the library's one default checkpoint (visiontools.models.DEFAULT_CHECKPOINT,
    cifar10_cct: convolutional tokens into plain transformer blocks, where ToMe pays on a CPU) with exactly
    its shipped trained weights (no random fallback), and says the accuracy its card records."""
    from safetensors.torch import load_file

    from visiontools import models
    from visiontools.demos import model_cache

    dm = ModelCache(allow_download=False).get("default")
    assert models.DEFAULT_CHECKPOINT == "cifar10_cct" and model_cache.DEFAULT_ALIASES == ("default", "cifar10_cct")
    assert not hasattr(model_cache, "DEFAULT_CHECKPOINT") or model_cache.DEFAULT_CHECKPOINT is models.DEFAULT_CHECKPOINT
    assert dm.classes[:3] == ["airplane", "automobile", "bird"] and dm.input_size == (32, 32)
    assert dm.trained and not dm.notice and "shipped CIFAR-10 checkpoint cifar10_cct" in dm.description
    card = json.loads(models.SHIPPED["cifar10_cct"].with_suffix(".json").read_text())
    assert "cct_vit_cifar" in dm.description and f"top-1 {card['eval']['rows'][0]['top1']:.1f}%" in dm.description
    assert dm.model.num_prefix_tokens == 0 and dm.num_patches == 64  # 64 convolutional tokens, no class token
    shipped = load_file(str(models.SHIPPED[models.DEFAULT_CHECKPOINT]))
    state = dm.model.state_dict()
    assert {f"model.{k}" for k in state} == set(shipped)
    assert all(torch.equal(v, shipped[f"model.{k}"]) for k, v in state.items())
    assert models.load(models.DEFAULT_CHECKPOINT)[1]["model"] == models.DEFAULT_ARCHITECTURE  # the fallback's shape


def test_first_view_draws_many_groups_on_a_fine_grid_with_the_classes_named(cat):
    """Issue 47: the merge tab's first view (the default model, DEFAULT_R, the block it opens on) draws at
    least a 14x14 patch grid, as the ToMe paper's figures do, with many groups (not "2 of 64"), in a middle
    block; the summary says what the picture is, and the line under the predictions names the 10
    CIFAR-10 classes the default classifier knows."""
    from visiontools.demos.merge_tab import DEFAULT_R
    from visiontools.demos.merging import CIFAR10_CLASSES, classes_note, first_view_block

    dm = ModelCache(allow_download=False).get("default")
    rows, cols = dm.picture_grid
    assert rows >= 14 and cols >= 14
    block = first_view_block(dm, DEFAULT_R)
    assert 1 <= block < dm.depth
    res = analyse(dm, cat, DEFAULT_R, layer=block)
    assert res.groups >= rows * cols // 3 and res.groups >= 60, res.groups
    assert len(np.unique(np.asarray(res.visualisation).reshape(-1, 3), axis=0)) > res.groups // 2  # drawn
    h, w = dm.picture[0].patch_embed.img_size
    text = res.summary(dm, DEFAULT_R, "constant")
    assert f"**{res.groups} of {rows * cols} patch groups after block {block} of {dm.depth}**" in text, text
    assert f"merged on a {h}x{w} copy of the image ({rows}x{cols} patches; its own input is 32x32" in text, text
    note = classes_note(dm)
    assert note.startswith("This classifier knows only the 10 CIFAR-10 classes: ")
    assert all(c in note for c in CIFAR10_CLASSES) and tuple(dm.classes) == CIFAR10_CLASSES


def test_picture_model_is_the_same_model_on_a_larger_input(dm):
    """visiontools.pictures: the picture copy of the default (dynamic-size) model computes exactly what the
    model computes on that larger input; for a fixed-size ViT with a class token (cifar10_vit) the copy
    has its position embeddings resampled and the original is left unchanged; r scales by k*k."""
    from visiontools.pictures import picture_model, picture_r, picture_scale

    default = ModelCache(allow_download=False).get("default").model
    pic, k = picture_model(default)
    assert k == 2 and tuple(pic.patch_embed.grid_size) == (16, 16) and tuple(default.patch_embed.grid_size) == (8, 8)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(pic(x), default(x))
    vit = dm.model
    pos = vit.pos_embed.detach().clone()
    pic, k = picture_model(vit)
    assert k == 2 and pic.pos_embed.shape == (1, 1 + 256, 192) and vit.pos_embed.shape == (1, 65, 192)
    assert torch.equal(vit.pos_embed, pos) and tuple(vit.patch_embed.img_size) == (32, 32)
    assert torch.equal(pic.pos_embed[:, :1], pos[:, :1])  # the class token's embedding is kept
    with torch.inference_mode():
        assert pic(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert picture_model(vit, min_grid=8) == (vit, 1) and picture_scale(vit, 24) == 3
    assert picture_r(8, 3, 2) == [32, 32, 32] and picture_r((4, -0.5), 3, 1) == (4, -0.5)
    assert picture_r((4, -0.5), 3, 2) == [24, 16, 8]


def test_default_checkpoint_is_one_for_library_cli_and_demo():
    """The library, `eval`, `video` and the demo open on the same checkpoint."""
    from visiontools import models
    from visiontools.cli import build_parser

    assert models.load_default_model()[1]["path"] == str(models.SHIPPED[models.DEFAULT_CHECKPOINT])
    assert build_parser().parse_args(["video", "--in", "a.mp4", "--out", "b.mp4"]).model == models.DEFAULT_CHECKPOINT
    from visiontools.evaluate import load_model_for_eval

    assert load_model_for_eval(None, None, False, "cifar10", torch.device("cpu"))[1]["path"] == \
        str(models.SHIPPED[models.DEFAULT_CHECKPOINT])


def test_broken_default_checkpoint_falls_back_to_its_architecture_with_a_notice(monkeypatch, tmp_path):
    from visiontools.demos import model_cache

    monkeypatch.setitem(model_cache.SHIPPED, "cifar10_cct", tmp_path / "gone.safetensors")
    dm = model_cache.load_model("default", allow_download=False)
    assert not dm.trained and "could not be loaded" in dm.notice and "cct_vit_cifar" in dm.notice
    assert dm.classes[0] == "airplane" and dm.grid_size == (8, 8)


def test_other_shipped_checkpoints_load_by_name_from_the_page():
    """Shipped names are files of the package, not user paths: the page may choose them. The more accurate
    conv-augmented conformer_cifar10 (no class token) stays selectable by name."""
    dm = ModelCache(allow_download=False).get("conformer_cifar10")
    assert dm.trained and dm.model.num_prefix_tokens == 0 and dm.grid_size == (8, 8)
    assert "conformer_cifar10" in dm.description and "conformer_vit_cifar_cct" in dm.description
    assert "top-1 87.0%" in dm.description


def test_checkpoint_paths_only_from_the_command_line():
    from visiontools.models import SHIPPED

    path = str(SHIPPED["cifar10_vit"])
    with pytest.raises(ValueError, match="only be chosen when the demo is started"):
        ModelCache(allow_download=False).get(path)
    dm = ModelCache(allow_download=False, default=path).get(path)
    assert dm.trained and dm.classes[3] == "cat" and dm.input_size == (32, 32)
    assert "cifar10_vit.safetensors" in dm.description


def test_unknown_model_name_gives_message():
    with pytest.raises(ValueError, match="not a timm model name"):
        load_model("vit_does_not_exist_123", allow_download=False)


def test_hub_only_model_without_download_is_refused_with_reason():
    with pytest.raises(ValueError, match="only defined on the Hugging Face hub.*Downloads are turned off"):
        load_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", allow_download=False)


def test_non_vit_model_is_refused_with_reason():
    with pytest.raises(ValueError, match="cannot be used in this demo.*VisionTransformer"):
        load_model("resnet18", allow_download=False)


def test_timm_vit_without_download_uses_random_weights_with_notice():
    m = load_model("vit_tiny_patch16_224", allow_download=False)
    assert not m.trained and "random weights" in m.notice and "meaningless" in m.notice
    assert m.grid_size == (14, 14) and len(m.classes) == 1000 and m.classes[0] == "tench"


# --- speed ----------------------------------------------------------------------------------------

def test_measure_speed_reports_all_candidates_and_flop_ratio(dm, cat):
    from visiontools.demos.speed import measure_speed, speed_chart, sweep_values

    seen = []
    res = measure_speed(dm, model_input(dm, cat), 8, batch_size=2, repeats=2, sweep=True,
                        progress=lambda f, text: seen.append(f))
    names = [row.name for row in res.rows]
    assert names[0] == "unpatched" and names[-1] == "ToMe r=8 (constant)"
    assert names[1:-1] == [f"ToMe r={v} (constant)" for v in sweep_values(8)[:-1]]
    table = res.table()
    assert table[0][3] == 1.0 and table[0][5] == 1.0
    flop_ratios = [row[5] for row in table]
    # more merging, fewer FLOPs (the plain ViT: 65 -> 25 tokens at r=8 over 6 blocks)
    assert flop_ratios == sorted(flop_ratios) and flop_ratios[-1] > 1.5
    n0 = dm.num_patches + dm.model.num_prefix_tokens  # tokens written as bench and eval write them
    assert table[0][6] == "all" and table[-1][6] == f"{n0} -> {n0 - 8 * (dm.depth - 1)}" == "65 -> 25"
    assert all(row[1] > 0 and row[2] > 0 for row in table)
    assert seen[0] == 0 and seen[-1] == 1.0 and seen == sorted(seen)
    fig = speed_chart(res)
    assert len(fig.axes[0].patches) == len(names)
    with pytest.raises(ValueError, match="batch_size"):
        measure_speed(dm, model_input(dm, cat), 8, batch_size=0)


def test_measure_speed_thread_setting_is_used_and_restored(dm, cat):
    from visiontools.demos.speed import measure_speed

    before = torch.get_num_threads()
    res = measure_speed(dm, model_input(dm, cat), 4, batch_size=1, repeats=1, warmup=0, threads=2)
    assert "2 threads" in res.machine and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        measure_speed(dm, model_input(dm, cat), 4, threads=0)


def test_thread_choices():
    import os

    from visiontools.demos.speed_tab import thread_choices

    ch = thread_choices()
    assert ch[0] == 1 and ch[-1] == (os.cpu_count() or 1) and ch == sorted(set(ch))


def test_sweep_values():
    from visiontools.demos.speed import sweep_values

    assert sweep_values(8) == [2, 4, 6, 8]
    assert sweep_values(2) == [1, 2]
    assert sweep_values(0) == [0]


# --- Gradio callbacks and app ---------------------------------------------------------------------

def test_run_merge_callback_outputs_and_bad_uploads(tmp_path):
    from visiontools.demos import merge_tab as app

    vis, table, summary, before, after, status = app.run_merge(CAT, "default", 4, "constant", 3)
    assert isinstance(vis, Image.Image) and len(table) >= 3 and "after block 3" in summary
    assert len(before) == 5 and len(after) == 5

    bad = tmp_path / "upload.png"
    bad.write_bytes(b"\x00\x01 definitely not a png")
    with pytest.warns(UserWarning):
        out = app.run_merge(str(bad), "default", 4, "constant", 3)
    assert out[0] is None and "Could not use this upload" in out[-1] and "not an image file" in out[-1]

    grey = tmp_path / "grey.jpg"
    Image.open(CAT).convert("L").save(grey)
    out = app.run_merge(str(grey), "default", 4, "constant", 3)
    assert isinstance(out[0], Image.Image) and "greyscale" in out[-1]

    assert app.run_merge(None, "default", 4, "constant", 3)[-1].startswith("Upload an image")


def test_run_merge_reports_unexpected_failures_instead_of_raising(monkeypatch):
    import visiontools.demos.merging
    from visiontools.demos import merge_tab as app

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside the model")

    monkeypatch.setattr(visiontools.demos.merging, "analyse", broken)
    with pytest.warns(UserWarning):
        out = app.run_merge(CAT, "default", 4, "constant", 3)
    assert out[0] is None and "Something went wrong: RuntimeError: simulated failure" in out[-1]


def test_run_speed_callback(tmp_path):
    from visiontools.demos import speed_tab as app

    fig, table, note = app.run_speed(CAT, "default", 4, "decreasing", 2, 2, False, 1)
    assert [row[0] for row in table] == ["unpatched", "ToMe r=4 (decreasing)"]
    assert "measured speedup" in note and "fewer FLOPs" in note and fig.axes
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    with pytest.warns(UserWarning):
        fig, table, note = app.run_speed(str(bad), "default", 4, "constant", 2, 2, False, 1)
    assert fig is None and "not an image file" in note


def test_load_model_callback_reports_unknown_model():
    from visiontools.demos import merge_tab as app

    with pytest.warns(UserWarning):
        out = app.load_model_ui("no_such_model_xyz")
    assert "Could not load model" in out[-1] and "not a timm model name" in out[-1]


def test_switching_model_updates_sliders_and_warns_about_random_weights(monkeypatch):
    from visiontools.demos import merge_tab as app
    from visiontools.demos import state

    monkeypatch.setattr(state, "_CACHE", ModelCache(allow_download=False))
    with pytest.warns(UserWarning, match="random weights"):
        info, r, layer, classes, status = app.load_model_ui("deit_tiny_patch16_224")
    assert "14x14 = 196 patches" in info and "meaningless" in info and "Merge pictures" not in info
    assert classes == "This classifier knows 1000 classes (those it was trained on)."
    assert r["maximum"] == 98 and r["value"] == app.DEFAULT_R and layer["maximum"] == 12 and layer["value"] == 12
    vis, table, summary, before, after, _ = app.run_merge(CAT, "deit_tiny_patch16_224", 16, "decreasing", 12)
    assert vis.size == (384, 384) and len(table) == 12 and table[0][1] == 197
    assert sum(row[2] for row in table) == 197 - table[-1][3]
    assert all(k in state.cache().get("deit_tiny_patch16_224").classes for k in before)


def test_upload_path_accepts_raw_component_values():
    from gradio.data_classes import FileData

    from visiontools.demos.state import upload_path

    assert upload_path(None) is None and upload_path(CAT) == CAT
    assert upload_path({"path": CAT, "url": "http://x/file=cat.jpg", "orig_name": "cat.jpg"}) == CAT
    assert upload_path(FileData(path=CAT)) == CAT


def test_build_demo_and_cli_options():
    from visiontools.demos import app

    demo = app.build_demo()
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"input-image", "r-slider", "layer-slider", "merge-vis", "token-table", "top5-before",
            "top5-after", "speed-chart", "measure"} <= ids
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    assert all(a.help for a in parser._actions if a.dest != "help")
    args = parser.parse_args([])
    assert (args.host, args.port, args.model, args.share) == ("127.0.0.1", 7860, "default", False)
    tabs = [getattr(b, "label", None) for b in demo.blocks.values() if type(b).__name__ == "Tab"]
    assert tabs == ["Which patches merge", "Measured speed", "Stable Diffusion (ToMe-SD)", "Hyena", "Video"]


def test_tabs_share_one_interface_and_never_import_the_app():
    """Every tab is a module with TITLE, available() and build_tab(gr, shared), composed by app.add_tabs;
    what tabs share lives in demos/state.py, so no tab imports demos/app.py (not even inside a function)."""
    import ast
    import inspect

    from visiontools.demos import app

    tabs = app.tab_modules()
    assert [t.__name__.rpartition(".")[2] for t in tabs] == ["merge_tab", "speed_tab", "sd_tab", "hyena_tab",
                                                            "video_tab"]
    for tab in tabs:
        assert isinstance(tab.TITLE, str) and callable(tab.available)
        assert list(inspect.signature(tab.build_tab).parameters) == ["gr", "shared"], tab.__name__
        imported = {n.module for n in ast.walk(ast.parse(inspect.getsource(tab))) if isinstance(n, ast.ImportFrom)}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(ast.parse(inspect.getsource(tab)))
                     if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not {m for m in imported if m and m.endswith("demos.app")}, tab.__name__
    assert "__import__" not in inspect.getsource(app)


def test_a_missing_tab_shows_its_note_and_the_others_still_build(monkeypatch):
    import gradio as gr

    from visiontools.demos import app, hyena_tab, sd_tab, state

    monkeypatch.setattr(sd_tab, "available", lambda: False)
    monkeypatch.setattr(hyena_tab, "available", lambda: False)
    shared = state.Shared()
    with gr.Blocks() as demo:
        app.add_tabs(gr, shared, [sd_tab, hyena_tab])
    texts = {getattr(b, "elem_id", None): getattr(b, "value", None) for b in demo.blocks.values()}
    assert texts["sd-missing"] == sd_tab.MISSING and "pip install -e '.[sd]'" in sd_tab.MISSING
    assert not any(k and k.startswith("hyena") for k in texts)  # no MISSING note: no tab at all


# --- Stable Diffusion tab ---------------------------------------------------------------------------

def test_sd_and_hyena_tabs_are_available_in_the_dev_install():
    from visiontools.demos import hyena_tab, sd_tab

    assert sd_tab.available() and hyena_tab.available()


def test_sd_latent_from_image(cat):
    from visiontools.demos.sd_tab import image_latent

    x = image_latent(cat, 32)
    assert x.shape == (1, 4, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, 3], 0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2])


def test_sd_merge_maps_show_the_plan_the_patched_block_used(cat):
    """The plan drawn is the one the patched attention used: recomputing the block's self-attention
    with it reproduces the block's output."""
    from visiontools.tome import merge2d
    from visiontools.demos.images import square_resized
    from visiontools.patches.diffusers import apply_tome_sd
    from visiontools.tome.vis import render_merges

    from visiontools.demos.sd_tab import (
        TIMESTEP, _text_embedding, exact_plan_options, image_latent, sd_merge_maps, shared_copy, tiny_unet,
    )

    maps = sd_merge_maps(cat, 0.5, 2, latent_side=32, display_side=128)
    assert [(b.downsample, b.grid) for b in maps][:2] == [(1, (32, 32)), (2, (16, 16))]
    assert all(b.merged == b.grid[0] * b.grid[1] // 2 for b in maps)
    assert all(b.picture.size == (128, 128) for b in maps)
    assert "512 of 1024 merged" in maps[0].caption

    unet = apply_tome_sd(shared_copy(tiny_unet()), ratio=0.5, max_downsample=1, **exact_plan_options())
    block = unet.get_submodule(maps[0].name)
    attn1 = block.attn1
    seen = {}

    def grab_block(module, args, kwargs):
        seen["block"] = args[0] if args else kwargs["hidden_states"]

    def grab_in(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def grab_out(module, args, output):
        seen["out"] = output

    hooks = [block.register_forward_pre_hook(grab_block, with_kwargs=True),
             attn1.register_forward_pre_hook(grab_in, with_kwargs=True), attn1.register_forward_hook(grab_out)]
    with torch.inference_mode():
        unet(image_latent(cat, 32), torch.tensor(TIMESTEP), _text_embedding(unet))
        for h in hooks:
            h.remove()
        plan = merge2d.plan_merge_2d(seen["block"], 32, 32, 512, 2, 2, None)  # from the block's input
        again = merge2d.unmerge(attn1.processor.inner(attn1, merge2d.merge_2d(plan, seen["in"])), plan.index)
    torch.testing.assert_close(again, seen["out"], rtol=0, atol=0)  # the same computation, bit for bit
    view = square_resized(cat, 128, 128)
    assert np.array_equal(np.asarray(maps[0].picture), np.asarray(render_merges(view, plan.index[0], (32, 32))))
    # and a different plan (from the normed tokens, or other destinations) would not reproduce it
    for other in (merge2d.plan_merge_2d(seen["in"], 32, 32, 512, 2, 2, None),
                  merge2d.plan_merge_2d(seen["block"], 32, 32, 512, 2, 2, 123)):
        with torch.inference_mode():
            wrong = merge2d.unmerge(attn1.processor.inner(attn1, merge2d.merge_2d(other, seen["in"])), other.index)
        assert not torch.allclose(wrong, seen["out"], atol=1e-3)


def test_sd_merge_maps_draw_each_methods_own_plan(cat):
    """With ``method="pitome"`` the maps show PiToMe's plan (its energy picks other sources than
    ToMe's best matches): the plan drawn for the first block, rebuilt with that block's margin,
    reproduces the patched attention bit for bit. ToFu keeps ToMe's matching: its first block's map is ToMe's."""
    from visiontools.demos.images import square_resized
    from visiontools.demos.sd_tab import (
        TIMESTEP, _text_embedding, exact_plan_options, image_latent, sd_merge_maps, shared_copy, tiny_unet,
    )
    from visiontools.patches.diffusers import apply_tome_sd, method_rules, patched_blocks
    from visiontools.tome import merge2d
    from visiontools.tome.vis import render_merges

    maps = {m: sd_merge_maps(cat, 0.5, 1, latent_side=32, display_side=128, method=m)
            for m in ("tome", "tofu", "pitome")}
    pixels = {m: [np.asarray(b.picture) for b in v] for m, v in maps.items()}
    assert np.array_equal(pixels["tome"][0], pixels["tofu"][0])  # later blocks see ToFu's pruned outputs
    assert not np.array_equal(pixels["tome"][0], pixels["pitome"][0])
    assert [b.merged for b in maps["pitome"]] == [b.merged for b in maps["tome"]]

    unet = apply_tome_sd(shared_copy(tiny_unet()), ratio=0.5, max_downsample=1, method="pitome", **exact_plan_options())
    block, n_blocks = unet.get_submodule(maps["pitome"][0].name), len(patched_blocks(unet))
    seen = {}
    hooks = [block.register_forward_pre_hook(lambda m, a, k: seen.update(block=a[0] if a else k["hidden_states"]),
                                             with_kwargs=True),
             block.attn1.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0] if a else k["hidden_states"]),
                                                   with_kwargs=True),
             block.attn1.register_forward_hook(lambda m, a, out: seen.update(out=out))]
    with torch.inference_mode():
        unet(image_latent(cat, 32), torch.tensor(TIMESTEP), _text_embedding(unet))
        for h in hooks:
            h.remove()
        margin, reduce = method_rules("pitome", 0, n_blocks)
        plan = merge2d.plan_merge_2d(seen["block"], 32, 32, 512, 2, 2, None, energy_margin=margin, reduce=reduce)
        again = merge2d.unmerge(block.attn1.processor.inner(block.attn1, merge2d.merge_2d(plan, seen["x"])), plan.index)
    torch.testing.assert_close(again, seen["out"], rtol=0, atol=0)
    view = square_resized(cat, 128, 128)
    assert np.array_equal(pixels["pitome"][0], np.asarray(render_merges(view, plan.index[0], (32, 32))))


def test_sd_speed_rows():
    from visiontools.demos.sd_tab import sd_speed

    rows, machine = sd_speed(0.5, 1, latent_side=32, repeats=1, warmup=0)
    assert [r[0] for r in rows] == ["unpatched", "ToMe-SD merge @ 0.5", "ToMe-SD downsample @ 0.5"]
    assert rows[0][2] == 1.0 and rows[0][3] == 1.0
    assert rows[1][3] > 1.2 and rows[2][3] > 1.2  # fewer FLOPs in self-attention
    assert all(r[1] > 0 for r in rows) and ("CPU" in machine or "cuda" in machine.lower())
    rows, _ = sd_speed(0.5, 1, latent_side=32, repeats=1, warmup=0, method="pitome")
    assert [r[0] for r in rows][1] == "ToMe-SD merge @ 0.5 (pitome)" and rows[1][3] > 1.2


# --- Hyena tab --------------------------------------------------------------------------------------

def test_hyena_filter_bank_is_what_the_layer_convolves_with():
    from visiontools.patches.timm_hyena import hyena_layers

    from visiontools.demos.hyena_tab import filter_bank, filter_figure, hyena_model

    model, desc, trained = hyena_model()
    assert trained and "random weights" not in desc
    k = filter_bank(model, 1, 1)
    mixer = hyena_layers(model)[1].mixer
    h, w = model.patch_embed.grid_size
    assert k.shape == (mixer.dim, 2 * h - 1, 2 * w - 1)
    with torch.no_grad():
        assert torch.equal(k, mixer.filter((h, w))[mixer.dim:2 * mixer.dim])
    assert not torch.equal(k, filter_bank(model, 1, 0))
    fig = filter_figure(k, show=8)
    assert len(fig.axes) == 8
    from visiontools.demos.hyena_tab import filters_ui

    fig, note = filters_ui(2, 0)
    assert len(fig.axes) == 8 and "block 2" in fig._suptitle.get_text() and "Red = positive" in note
    with pytest.raises(ValueError, match="block must be between"):
        filter_bank(model, len(model.blocks), 0)


def test_hyena_block_timing_rows():
    from visiontools.demos.hyena_tab import TIMING_HEADERS, block_timing, timing_figure, timing_rows

    result = block_timing((4, 8), dim=32, heads=2, repeats=1)
    rows = timing_rows(result)
    assert [r[:2] for r in rows] == [["4x4", 16], ["8x8", 64]] and all(len(r) == len(TIMING_HEADERS) for r in rows)
    for row, raw in zip(rows, result["rows"]):
        assert row[3] > 0 and row[4] > 0
        assert row[5] == pytest.approx(raw["attn_ms"] / raw["hyena_ms"], abs=0.01)
    assert len(timing_figure(result).axes[0].lines) == 3


def test_hyena_checkpoint_is_used_when_shipped():
    from visiontools.models import CHECKPOINT_DIR

    from visiontools.demos.hyena_tab import hyena_model

    from safetensors.torch import load_file

    model, desc, trained = hyena_model()
    shipped = sorted(CHECKPOINT_DIR.glob("*hyena*.safetensors"))
    assert trained and shipped and shipped[0].name in desc and "random weights" not in desc
    weights = load_file(str(shipped[0]))
    assert all(torch.equal(v, weights[f"model.{k}"]) for k, v in model.state_dict().items())


def test_sd_tab_callback_and_bad_upload(tmp_path):
    from visiontools.demos.sd_tab import LATENT_SIDES, merge_maps_ui

    side = next(k for k, v in LATENT_SIDES.items() if v == 32)
    gallery, note = merge_maps_ui({"path": CAT}, 0.5, 1, side)
    assert len(gallery) == 3 and all(isinstance(p, Image.Image) for p, _ in gallery)
    assert "3 patched self-attention blocks" in note and "1536 of 3072 tokens merged" in note
    assert "method `pitome`" in merge_maps_ui({"path": CAT}, 0.5, 1, side, "pitome")[1]
    bad = tmp_path / "latent.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning):
        gallery, note = merge_maps_ui(str(bad), 0.5, 1, side)
    assert gallery == [] and "⚠️" in note
