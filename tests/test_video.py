"""Video through ToMe (visiontools/video.py, `visiontools video`): a generated clip of moving shapes
with a known frame count goes through the shipped CIFAR-10 ViT; the output's frame count, size and
codec, the merge maps against the still-image functions, and bad videos (one clear line, no file)."""
from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from visiontools import video
from visiontools.cli import main
from visiontools.patches.timm import apply_tome, tome_forward
from visiontools.tome.vis import render_merges

FRAMES, W, H, FPS = 20, 96, 64, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shapes_frame(i: int) -> np.ndarray:
    """Frame ``i`` (RGB): a textured background with a red disc moving right and a blue square moving down."""
    rng = np.random.default_rng(i)
    f = (np.linspace(40, 200, W)[None, :, None] + rng.integers(0, 30, (H, W, 3))).astype(np.uint8)
    cv2.circle(f, (8 + 4 * i, 20), 10, (230, 40, 40), -1)
    cv2.rectangle(f, (60, 2 + 2 * i), (80, 22 + 2 * i), (40, 60, 220), -1)
    return f


def write_clip(path: Path, frames: int = FRAMES, size=(W, H), fourcc: str = "mp4v") -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, size)
    assert w.isOpened()
    for i in range(frames):
        f = shapes_frame(i) if size == (W, H) else np.full((size[1], size[0], 3), 90, np.uint8)
        w.write(np.ascontiguousarray(f[..., ::-1]))
    w.release()
    return path


def read_all(path) -> tuple[list[np.ndarray], str]:
    """Every frame (RGB) and the fourcc of a video file."""
    cap = cv2.VideoCapture(str(path))
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames, fourcc


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "shapes.mp4")


@pytest.fixture(scope="module")
def vit():
    model, mean, std, _ = video.load_model("cifar10_vit")
    return model, mean, std


@pytest.fixture(scope="module")
def annotated(clip, vit, tmp_path_factory):
    model, mean, std = vit
    out = tmp_path_factory.mktemp("out") / "merged.mp4"
    res = video.annotate_video(model, clip, out, r=6, mean=mean, std=std, block=3, batch_size=6,
                               out_height=120, keep_sources=True, min_grid=0)  # the model's own 8x8 grid
    return res, out


def test_output_has_every_frame_at_the_reported_size_and_codec(annotated, clip):
    res, out = annotated
    frames, fourcc = read_all(out)
    assert res.frames == FRAMES and len(frames) == FRAMES
    pw, ph = video.display_size(W, H, 120)
    assert (pw, ph) == (180, 120)
    assert res.size == (frames[0].shape[1], frames[0].shape[0])
    assert res.size[0] == 2 * pw and res.size[1] > ph   # frame | merge map, text bar underneath
    assert fourcc == "FMP4"                              # what mp4v reads back as
    assert cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FPS) == FPS
    assert [p.name for p in out.parent.iterdir()] == ["merged.mp4"]  # no partial file left
    # timing: one ToMe and one baseline measurement per batch of 6 (6+6+6+2 frames)
    assert res.batch_frames == [6, 12, 18, 20]
    assert len(res.tome_seconds) == len(res.base_seconds) == 4 and res.fps_tome > 0 and res.fps_base > 0
    # 65 tokens (64 patches + class token), 6 merged per block
    assert res.tokens_per_layer == [65, 59, 53, 47, 41, 35, 29] and res.tokens_after_block == 47
    # each frame's text: its number, the tokens after block 3, and the FPS measured up to its batch
    for k, batch in ((0, 0), (13, 2), (19, 3)):
        line1, line2 = res.texts[k]
        assert line1.startswith(f"frame {k + 1}/{FRAMES} ") and "47 tokens after block 3/6 (of 65, 1 class)" in line1
        fps_t = res.batch_frames[batch] / sum(res.tome_seconds[:batch + 1])
        fps_b = res.batch_frames[batch] / sum(res.base_seconds[:batch + 1])
        assert f"ToMe {fps_t:.1f}   without ToMe {fps_b:.1f}" in line2, (line2, fps_t, fps_b)


def test_every_frame_is_written_when_its_text_changes_width(clip, vit, tmp_path, monkeypatch):
    """The text under a frame (its FPS numbers) changes width from frame to frame; the bar keeps its
    height, so OpenCV, which silently drops a frame of another size, writes all of them."""
    short = np.zeros((60, 90, 3), np.uint8)
    sizes = {video.annotate_frame(short, torch.arange(64), (8, 8), ["a", text]).shape
             for text in ("b", "ToMe 1234567.8 FPS   without ToMe 1234567.8 FPS " * 3)}
    assert len(sizes) == 1, sizes
    real = video._frame_text
    monkeypatch.setattr(video, "_frame_text", lambda res, i, *a: [*real(res, i, *a)[:1], "FPS " + "9" * (3 * i)])
    model, mean, std = vit
    out = tmp_path / "widening.mp4"
    res = video.annotate_video(model, clip, out, r=6, mean=mean, std=std, block=3, batch_size=6, out_height=120,
                               min_grid=0)
    assert res.frames == FRAMES and len(read_all(out)[0]) == FRAMES


def test_frame_text_of_a_model_without_a_class_token_says_so():
    res = video.VideoResult(path="x", frames=0, input=None, size=(0, 0), codec="VP80", block=2,
                            tokens_per_layer=[64, 56, 48])
    line1, _ = video._frame_text(res, 1, 10, 8, 2, 0, 8, 2.0, 1.0)
    assert line1.endswith("48 tokens after block 2/2 (of 64, no class token)"), line1


def test_merge_map_of_a_frame_equals_the_still_image_functions(annotated, clip, vit):
    """Each frame's map equals tome_forward + render_merges run on that frame alone, and the drawn
    right-hand panel of the written video shows it."""
    model, mean, std = vit
    res, out = annotated
    inputs, _ = read_all(clip)
    outputs, _ = read_all(out)
    tome = apply_tome(copy.copy(model), r=6)
    pw, ph = video.display_size(W, H, 120)
    maps = []
    for k in (0, 7, FRAMES - 1):
        x = video.model_input([inputs[k]], (32, 32), mean, std)
        with torch.inference_mode():
            _, info = tome_forward(tome, x, trace_source=True)
        source = info.layer_sources[2][0]   # after block 3
        assert torch.equal(res.sources[k], source), k
        view = cv2.resize(inputs[k], (pw, ph), interpolation=cv2.INTER_AREA)
        expected = np.asarray(render_merges(Image.fromarray(view), source, (8, 8)), dtype=np.float64)
        drawn = outputs[k][:ph, pw:].astype(np.float64)
        maps.append(expected)
        assert np.abs(drawn - expected).mean() < 6, k           # lossy MPEG-4: a few levels off
        assert np.abs(outputs[k][:ph, :pw] - view.astype(np.float64)).mean() < 6, k
    # the moving shapes change the maps: the first frame's map does not match the last frame's drawing
    assert np.abs(outputs[FRAMES - 1][:ph, pw:].astype(np.float64) - maps[0]).mean() > 10


def test_webm_output_for_browsers(clip, vit, tmp_path):
    model, mean, std = vit
    out = tmp_path / "merged.webm"
    res = video.annotate_video(model, clip, out, r=4, mean=mean, std=std, max_frames=5, batch_size=4, out_height=64,
                               keep_sources=True)
    frames, fourcc = read_all(out)
    assert res.frames == 5 and len(frames) == 5 and fourcc == "VP80" and res.block == 6
    assert frames[0].shape[:2] == (res.size[1], res.size[0])
    # by default the merge map has at least 14x14 patches (issue 47): the 8x8-patch model runs on 64x64
    # frames (16x16 patches + class token) with every block's r x4, and says so
    assert res.grid == (16, 16) and res.scale == 2 and res.input_size == (64, 64)
    assert res.tokens_per_layer == [257 - 16 * i for i in range(7)] and res.sources[0].shape == (256,)
    assert res.texts[0][0].startswith("frame 1/") and "ToMe r=4 (x4 at 64x64): 161 tokens after block 6/6" in \
        res.texts[0][0], res.texts[0][0]
    assert res.picture_text == " at a 64x64 input (16x16 patches, every block's r x4)"


def test_cli_writes_the_clip_and_reports(clip, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    assert main(["video", "--in", str(clip), "--out", str(out), "--r", "8", "--max-frames", "7",
                 "--batch-size", "3", "--height", "64", "--threads", "1", "--no-progress"]) == 0
    frames, _ = read_all(out)
    assert len(frames) == 7
    printed = capsys.readouterr().out
    # the default, cifar10_cct (8x8 patches), draws a 16x16 map: 64x64 frames, every block's r x4
    assert f"wrote {out}: 7 frames" in printed and "r=8 at a 64x64 input (16x16 patches, every block's r x4): " \
        "32 of 256 tokens after block 7" in printed, printed
    out = tmp_path / "own.mp4"
    assert main(["video", "--in", str(clip), "--out", str(out), "--r", "8", "--max-frames", "3", "--min-grid", "0",
                 "--batch-size", "3", "--height", "64", "--threads", "1", "--no-progress"]) == 0
    assert "r=8: 8 of 64 tokens after block 7" in capsys.readouterr().out  # --min-grid 0: its own 32x32 input


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["video", "--help"])
    text = capsys.readouterr().out
    for opt in ("--in", "--out", "--model", "--pretrained", "--r", "--block", "--min-grid", "--batch-size",
                "--max-frames", "--height", "--threads", "--no-progress"):
        assert opt in text, opt


def test_pan_clip_from_a_bundled_photo(tmp_path):
    photo = sorted((Path(video.__file__).parent / "assets").glob("*.jpg"))[0]
    out = video.make_pan_clip(photo, tmp_path / "pan.webm", frames=12, size=(64, 48))
    frames, fourcc = read_all(out)
    assert len(frames) == 12 and frames[0].shape == (48, 64, 3) and fourcc == "VP80"
    assert np.abs(frames[0].astype(float) - frames[-1].astype(float)).mean() > 10  # the camera moves


# ------------------------------------------------------------------------------------- bad videos

def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _no_index(src: Path, dst: Path) -> Path:
    """An MP4 whose recording stopped before its index was written: every box before 'moov' kept whole."""
    data = src.read_bytes()
    dst.write_bytes(data[: data.index(b"moov") - 4])
    return dst


def _bad_videos(d: Path, clip: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text its error must contain)."""
    text = d / "notes.mp4"
    text.write_text("a text file with a video's name\n" * 20)
    zero = write_clip(d / "zero.avi", frames=0, fourcc="MJPG")
    avi = write_clip(d / "ok.avi", frames=5, fourcc="MJPG")
    codec = d / "codec.avi"
    codec.write_bytes(avi.read_bytes().replace(b"MJPG", b"ZZZZ"))   # a codec FFmpeg does not know
    webm = write_clip(d / "ok.webm", frames=FRAMES, fourcc="VP80")
    huge = write_clip(d / "huge.mp4", frames=1, size=(4200, 4200))
    return {
        "text": (text, "is not a video file"),
        "zero frames": (zero, "has no frames"),
        "truncated mp4": (_truncated(clip, d / "cut.mp4"), "truncated"),
        "mp4 without index": (_no_index(clip, d / "no_index.mp4"), "no index ('moov' box)"),
        "truncated webm": (_truncated(webm, d / "cut.webm"), "reports 20 frames but only"),
        "unsupported codec": (codec, "codec is not supported"),
        "huge": (huge, "4200x4200 frames (18 megapixels); the limit is 17"),
        "empty": ((d / "empty.mp4").resolve(), "is empty"),
        "missing": (d / "nothing_here.mp4", "does not exist"),
    }


def test_bad_videos_get_one_clear_line_and_leave_no_file(clip, tmp_path, capfd):
    (tmp_path / "empty.mp4").write_bytes(b"")
    bad = _bad_videos(tmp_path, clip)
    capfd.readouterr()  # drop what writing the files printed; from here on only the CLI's output counts
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, (path, expected) in bad.items():
        rc = main(["video", "--in", str(path), "--out", str(out_dir / "o.mp4"), "--no-progress", "--threads", "1"])
        err = capfd.readouterr().err   # file-descriptor level: OpenCV's and FFmpeg's C-level prints too
        assert rc == 2, (name, rc, err)
        assert err.startswith("visiontools: error: ") and err.count("\n") == 1, (name, err)
        assert expected in err, (name, err)
        assert "Traceback" not in err and "[ERROR" not in err, err  # one line: no OpenCV/FFmpeg prints
        assert list(out_dir.iterdir()) == [], (name, list(out_dir.iterdir()))


@pytest.mark.parametrize("argv,expected", [
    (["--model", "not_a_vit"], "unknown model 'not_a_vit'"),
    (["--model", "missing.safetensors"], "missing.safetensors"),
    (["--height", "8"], "--height must be at least 16"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--batch-size", "0"], "--batch-size) must be at least 1"),
    (["--max-frames", "0"], "--max-frames) must be at least 1"),
    (["--block", "99"], "--block) must be between 0 and"),
    (["--out", "{tmp}/o.avi"], "must end in .mp4 or .webm"),
    (["--out", "{tmp}/no/o.mp4"], "output folder"),
    (["--in", "{tmp}/nothing.mp4"], "does not exist"),
])
def test_cli_mistakes_are_one_line_with_status_2(clip, tmp_path, capfd, argv, expected):
    """video's everyday mistakes end like every command's: one ``visiontools: error:`` line, exit status 2."""
    base = {"--in": str(clip), "--out": str(tmp_path / "o.mp4")}
    opts = dict(base, **dict(zip(argv[::2], [a.format(tmp=tmp_path) for a in argv[1::2]])))
    capfd.readouterr()
    rc = main(["video", *[x for kv in opts.items() for x in kv], "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2 and err.startswith("visiontools: error: ") and err.count("\n") == 1, (rc, err)
    assert expected in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_bad_settings_are_refused(clip, vit, tmp_path):
    model, mean, std = vit
    with pytest.raises(video.VideoInputError, match="must end in .mp4 or .webm"):
        video.annotate_video(model, clip, tmp_path / "o.avi")
    with pytest.raises(video.VideoInputError, match="between 0 and 6"):
        video.annotate_video(model, clip, tmp_path / "o.mp4", block=7)
    with pytest.raises(video.VideoInputError, match="overwrite the input"):
        video.annotate_video(model, clip, clip)
    with pytest.raises(video.VideoInputError, match="output folder"):
        video.annotate_video(model, clip, tmp_path / "no" / "o.mp4")
    with pytest.raises(video.VideoInputError, match=r"batch size \(--batch-size\) must be at least 1"):
        video.annotate_video(model, clip, tmp_path / "o.mp4", batch_size=0)
    import timm
    with pytest.raises(video.VideoInputError, match="ToMe supports timm VisionTransformer.*; got ResNet"):
        video.annotate_video(timm.create_model("resnet10t"), clip, tmp_path / "o.mp4")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- demo tab

def test_demo_tab_annotates_caps_long_clips_and_explains_bad_ones(clip, tmp_path, monkeypatch):
    from visiontools.demos import video_tab

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    example = video_tab.example_clip()
    assert Path(example).parent == tmp_path / "cache" / "visiontools"
    assert video.probe_video(example).frame_count == 48
    mtime = Path(example).stat().st_mtime_ns
    assert video_tab.example_clip() == example and Path(example).stat().st_mtime_ns == mtime  # made once

    monkeypatch.setattr(video_tab, "MAX_FRAMES", 8)
    out, fig, note = video_tab.run_video(str(clip), 4, 2, 4)
    frames, fourcc = read_all(out)
    assert len(frames) == 8 and fourcc == "VP80"
    assert f"The clip has {FRAMES} frames (2.0 s); the demo processes the first 8 (0.8 s)" in note
    # the demo's default cifar10_cct (64 tokens, no class token) on 64x64 frames: 256 tokens, r x4
    assert "ToMe r=4 at a 64x64 input (16x16 patches, every block's r x4): **224 of 256 tokens** after block 2" \
        in note, note
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == 2   # tokens per block; FPS with / without ToMe
    assert fig.axes[0].get_ylabel() == "tokens per frame"       # no class token to count

    bad = tmp_path / "notes.webm"
    bad.write_text("not a clip")
    out, fig, note = video_tab.run_video({"path": str(bad)}, 4, 2, 4)
    assert out is None and fig is None and "Could not use this clip" in note and "is not a video file" in note
    assert video_tab.run_video(None, 4, 2, 4)[2] == "Upload a clip or pick the example."


def test_demo_webcam_frame_is_the_still_image_map(vit):
    from visiontools.demos import video_tab
    from visiontools.demos.app import _cache

    frame = shapes_frame(3)
    shown = video_tab.webcam_frame(frame, 6, 3)
    dm = _cache().get(None)
    pw, ph = video.display_size(W, H, video_tab.OUT_HEIGHT)
    pic, k = dm.picture  # the default model on 64x64 frames (16x16 patches), r x4
    assert k == 2 and dm.picture_grid == (16, 16)
    x = video.model_input([frame], (64, 64), dm.mean, dm.std)
    with torch.inference_mode():
        _, info = tome_forward(apply_tome(copy.copy(pic), r=24), x, trace_source=True)
    view = cv2.resize(frame, (pw, ph), interpolation=cv2.INTER_AREA)
    expected = np.asarray(render_merges(Image.fromarray(view), info.layer_sources[2][0], (16, 16)))
    assert np.array_equal(shown[:ph, pw:], expected) and np.array_equal(shown[:ph, :pw], view)


# ------------------------------------------------------------------ guards (issue 25): timing order, normalisation

def test_tome_and_baseline_take_turns_going_first_and_each_gets_its_own_time(clip, vit, monkeypatch):
    """With a fake clock that a baseline forward advances by 1 s and a ToMe forward by 3 s: after one
    untimed warm-up of each, batches alternate which model runs first (baseline on even batches), and
    each model is charged exactly its own forward."""
    import types

    from visiontools.patches import timm as tome_timm

    model, mean, std = vit
    clock = {"now": 0.0}
    calls = []
    real = tome_timm.tome_forward

    def tome_forward(m, x, trace_source=False):
        calls.append("tome")
        clock["now"] += 3.0
        return real(m, x, trace_source=trace_source)

    def base_hook(m, args):
        if not isinstance(m, tome_timm.ToMeVisionTransformer):
            calls.append("base")
            clock["now"] += 1.0

    monkeypatch.setattr(tome_timm, "tome_forward", tome_forward)
    monkeypatch.setattr(video, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    hook = model.register_forward_pre_hook(base_hook)
    try:
        res = video.annotate_video(model, clip, clip.parent / "order.mp4", r=4, mean=mean, std=std, max_frames=10,
                                   batch_size=3, out_height=48)
    finally:
        hook.remove()
        (clip.parent / "order.mp4").unlink(missing_ok=True)
    assert res.batch_frames == [3, 6, 9, 10]
    warmup, timed = calls[:2], calls[2:]
    assert warmup == ["base", "tome"]
    assert [tuple(timed[i:i + 2]) for i in range(0, len(timed), 2)] == [
        ("base", "tome"), ("tome", "base"), ("base", "tome"), ("tome", "base")]
    assert res.base_seconds == [1.0] * 4 and res.tome_seconds == [3.0] * 4


@pytest.mark.parametrize("name,mean,std", [
    ("cifar10_vit", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # its card: trained on CIFAR-10
    ("deit_tiny_patch16_224", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # timm cfg: ImageNet statistics
])
def test_cli_normalises_frames_with_the_models_own_mean_and_std(clip, tmp_path, monkeypatch, name, mean, std):
    """What the model sees is (frame resized with the area filter / 255 - mean) / std, with the
    statistics the model was trained with, written out here (not the helper's 0.5 default)."""
    seen = []
    real = video.load_model

    def load_model(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        return loaded

    monkeypatch.setattr(video, "load_model", load_model)
    assert main(["video", "--in", str(clip), "--out", str(tmp_path / "n.mp4"), "--model", name, "--max-frames", "2",
                 "--batch-size", "2", "--height", "32", "--threads", "1", "--no-progress"]) == 0
    frames, _ = read_all(clip)
    size = seen[0].shape[-1]
    expected = []
    for f in frames[:2]:
        small = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0
        expected.append(torch.from_numpy((small - np.array(mean)) / np.array(std)).permute(2, 0, 1))
    expected = torch.stack(expected)
    assert seen[0].shape == (2, 3, size, size)
    torch.testing.assert_close(seen[0].double(), expected, rtol=0, atol=1e-5)
