"""visiontools.tome.vis on a real photo."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from visiontools.patches.timm import apply_tome, tome_forward
from visiontools.tome.vis import group_count, render_merges


def test_render_merges_of_a_real_image(imagenet_image, tmp_path):
    img = imagenet_image.resize((224, 224))
    torch.manual_seed(0)
    model = apply_tome(VisionTransformer(patch_size=16, embed_dim=64, depth=4, num_heads=4).eval(), r=24)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        _, info = tome_forward(model, x, trace_source=True)
    source = info.source[0]
    assert group_count(source) == info.tokens_per_layer[-1] - 1 == 196 - 4 * 24
    out = render_merges(img, source, (14, 14), outline=(255, 0, 0))
    out.save(tmp_path / "merges.png")
    assert out.size == img.size and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    src = np.asarray(img).astype(int)
    ids = source.numpy().reshape(14, 14)
    # every group's fill is the mean colour of the original pixels it covers (checked away from outlines)
    for gid in np.unique(ids)[:20]:
        cells = np.argwhere(ids == gid)
        mask = np.zeros((224, 224), bool)
        for r, c in cells:
            mask[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = True
        inner = mask & ~np.all(arr == [255, 0, 0], axis=-1)
        mean = src[mask].mean(0)
        assert np.abs(arr[inner] - mean).max() <= 1
    # outlines are drawn exactly where neighbouring patches belong to different groups: on the last
    # pixel column (row) of a patch whose right (lower) neighbour is in another group, nowhere else
    expected = np.zeros((224, 224), bool)
    right = ids[:, :-1] != ids[:, 1:]
    below = ids[:-1, :] != ids[1:, :]
    for r, c in np.argwhere(right):
        expected[16 * r:16 * r + 16, 16 * c + 15] = True
    for r, c in np.argwhere(below):
        expected[16 * r + 15, 16 * c:16 * c + 16] = True
    assert right.any() and below.any() and not right.all()
    red = np.all(arr == [255, 0, 0], axis=-1)
    assert np.array_equal(red, expected)
    # a 2-pixel outline also covers the next pixel to the right and below
    wide = np.all(np.asarray(render_merges(img, source, (14, 14), outline=(255, 0, 0), outline_width=2)) == [255, 0, 0], -1)
    grown = expected.copy()
    grown[:, 1:] |= expected[:, :-1]
    grown[1:, :] |= grown[:-1, :].copy()
    assert np.array_equal(wide, grown)


def test_identity_source_gives_cell_means_and_bad_source_is_rejected(imagenet_image):
    img = imagenet_image.resize((40, 30))
    out = np.asarray(render_merges(img, np.arange(12), (3, 4), outline=None)).astype(int)
    src = np.asarray(img).astype(int)
    np.testing.assert_allclose(out[:10, :10], np.broadcast_to(src[:10, :10].mean((0, 1)), (10, 10, 3)), atol=1)
    with pytest.raises(ValueError, match="grid"):
        render_merges(img, np.arange(11), (3, 4))
    with pytest.raises(ValueError, match="one image"):
        render_merges(img, np.zeros((2, 12), int), (3, 4))
