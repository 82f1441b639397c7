"""Token merging on video: ``visiontools video``. Every frame of a clip goes through a ToMe-patched
timm ViT (in batches); each output frame shows the frame beside its merge map (merged patch groups
filled with their mean colour and outlined, as :func:`visiontools.tome.vis.render_merges` draws a photo),
the frame number, the tokens left after the chosen block, and the measured model frames per second
with and without ToMe. OpenCV reads and writes the video, one batch of frames at a time.

FPS is the model's forward pass only (no decoding, drawing or encoding): on every batch the
unpatched model and the ToMe model run on the same frames, one after the other, in alternating
order, after one untimed warm-up of each. The ToMe time includes tracing the source map that the
picture shows (one small gather per block).
"""
from __future__ import annotations

import argparse
import copy
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

# FFmpeg (inside OpenCV) prints its own warnings for every odd file; they would bury our one-line errors.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from visiontools.defaults import DEFAULT_CHECKPOINT, default_r_text  # noqa: E402
from visiontools.pictures import MIN_PICTURE_GRID  # noqa: E402

MAX_FRAME_PIXELS = 4096 * 4096   # larger frames are refused before any is decoded
DEFAULT_HEIGHT = 360             # output frame height (each panel), pixels
# output container -> OpenCV fourcc. mp4v (MPEG-4 Part 2) needs no external ffmpeg but browsers do not
# play it; VP8 in WebM plays in Chromium and Firefox. This OpenCV build cannot write H.264 (avc1).
CODECS = {".mp4": "mp4v", ".webm": "VP80"}


class VideoInputError(ValueError):
    """A video (or output path) that cannot be used; the message is meant for the user."""


def _cv2():
    try:
        import cv2
    except ModuleNotFoundError:
        raise VideoInputError("video needs OpenCV: pip install opencv-python-headless "
                              "(or pip install 'visiontools[video]')") from None
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # silent, even when cv2 was imported before this module set OPENCV_LOG_LEVEL
    return cv2


# ----------------------------------------------------------------------------------------------- reading

@dataclass
class VideoInfo:
    """What the container says about a video that OpenCV could open."""

    path: str
    width: int
    height: int
    fps: float
    frame_count: int   # as the container reports it (0 when unknown)
    codec: str         # fourcc, e.g. 'FMP4', 'VP80', 'h264'


def _sniff(path: Path) -> tuple[str | None, str]:
    """``(container, note)`` from the first bytes: which video container the file claims to be (None if
    none we know), and for MP4/MOV a note when its index ('moov' box) is missing or cut off."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
            return "AVI", ""
        if head[:4] == b"\x1a\x45\xdf\xa3":
            return "WebM/Matroska", ""
        if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
            size, boxes, pos = path.stat().st_size, [], 0
            while pos + 8 <= size and len(boxes) < 1000:
                f.seek(pos)
                n, kind = struct.unpack(">I4s", f.read(8))
                if n == 1:
                    n = struct.unpack(">Q", f.read(8))[0]
                elif n == 0:
                    n = size - pos
                if n < 8:
                    break
                boxes.append(kind)
                pos += n
            note = ""
            if pos > size:
                note = f"it is truncated (its last box needs {pos - size} more bytes)"
            elif b"moov" not in boxes:
                note = "it has no index ('moov' box): the recording was probably cut off before it was finished"
            return "MP4/MOV", note
        if head[:4] == b"\x00\x00\x01\xba":
            return "MPEG-PS", ""
        f.seek(0)
        ts = f.read(377)
        if len(ts) == 377 and ts[0] == ts[188] == ts[376] == 0x47:  # three 188-byte packets' sync bytes
            return "MPEG-TS", ""
    return None, ""


def probe_video(path, max_pixels: int = MAX_FRAME_PIXELS) -> VideoInfo:
    """Open ``path`` with OpenCV and check it is a video we can use, without decoding a frame.
    Raises :class:`VideoInputError` (not a file, not a video, truncated index, unsupported codec,
    frames larger than ``max_pixels``)."""
    cv2 = _cv2()
    path = Path(os.fspath(path))
    name = path.name
    if not path.is_file():
        raise VideoInputError(f"{str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise VideoInputError(f"{name!r} is empty (0 bytes)")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            container, note = _sniff(path)
            if container is None:
                raise VideoInputError(f"{name!r} is not a video file that OpenCV can read "
                                      "(supported: MP4, WebM, MKV, AVI, MOV with codecs FFmpeg decodes)")
            if note:
                raise VideoInputError(f"{name!r} looks like a video ({container}) but cannot be opened: {note}")
            raise VideoInputError(f"{name!r} looks like a video ({container}) but OpenCV cannot open it: it has no "
                                  "frames, is damaged, or its codec is not supported by this OpenCV build "
                                  "(re-encode it as H.264 MP4 or VP8/VP9 WebM)")
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        codec = fourcc.to_bytes(4, "little").decode("latin-1").strip("\x00 ") if fourcc > 0 else "unknown"
        info = VideoInfo(str(path), w, h, float(cap.get(cv2.CAP_PROP_FPS) or 0.0),
                         max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))), codec)
    finally:
        cap.release()
    if w < 1 or h < 1:
        raise VideoInputError(f"{name!r} has no video stream (frame size {w}x{h})")
    if w * h > max_pixels:
        raise VideoInputError(f"{name!r} has {w}x{h} frames ({w * h / 1e6:.0f} megapixels); the limit is "
                              f"{max_pixels / 1e6:.0f} megapixels per frame: scale the video down first")
    return info


def read_frames(info: VideoInfo, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """The frames of a probed video as RGB ``uint8`` arrays ``(H, W, 3)``, one at a time (the video
    is never held whole). Raises :class:`VideoInputError` for a video without decodable frames, or
    one that ends well before the frame count its container reports (truncated)."""
    cv2 = _cv2()
    name = Path(info.path).name
    cap = cv2.VideoCapture(info.path, cv2.CAP_FFMPEG)
    n = 0
    try:
        while max_frames is None or n < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            n += 1
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    if n == 0:
        raise VideoInputError(f"{name!r} has no frames that can be decoded (codec {info.codec!r}; it may be "
                              "empty, damaged, or use a codec this OpenCV build cannot decode)")
    expected = info.frame_count if max_frames is None else min(info.frame_count, max_frames)
    if n < expected - max(2, expected // 50):  # containers' counts may be estimates: allow 2 %
        raise VideoInputError(f"{name!r} is truncated or damaged: its container reports {info.frame_count} "
                              f"frames but only {n} could be decoded")


# ----------------------------------------------------------------------------------------------- drawing

def model_input(frames: list[np.ndarray], input_size: tuple[int, int], mean, std) -> torch.Tensor:
    """Whole frames (RGB uint8) resized (area filter, aspect not kept; frames already at that size
    are kept as they are) to the model's ``(H, W)`` input and normalised: ``(B, 3, H, W)`` float32."""
    cv2 = _cv2()
    h, w = input_size
    x = np.stack([f if f.shape[:2] == (h, w) else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA)
                  for f in frames])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def display_size(width: int, height: int, out_height: int = DEFAULT_HEIGHT) -> tuple[int, int]:
    """``(w, h)`` of one panel: the frame scaled to ``out_height`` px high, both even (codecs want that)."""
    h = max(2, out_height - out_height % 2)
    w = max(2, round(width * h / height / 2) * 2)
    return w, h


def merge_panel(frame: np.ndarray, source, grid_size: tuple[int, int]) -> np.ndarray:
    """The merge map of one frame, drawn exactly as :func:`visiontools.tome.vis.render_merges` draws a photo."""
    from PIL import Image

    from visiontools.tome.vis import render_merges

    return np.asarray(render_merges(Image.fromarray(frame), source, grid_size))


def annotate_frame(frame: np.ndarray, source, grid_size: tuple[int, int], lines: list[str]) -> np.ndarray:
    """One output frame (RGB): ``frame`` (already at display size) beside its merge map, and a text
    bar with ``lines`` underneath."""
    cv2 = _cv2()
    h, w = frame.shape[:2]
    panels = np.concatenate([frame, merge_panel(frame, source, grid_size)], axis=1)
    scale = min(0.6, max(0.35, 2 * w / 1100))
    line_h = int(28 * scale / 0.6)  # from the width alone: every frame of a clip has the same size
    widest = max((cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)[0][0] for t in lines), default=1)
    scale = min(scale, (2 * w - 16) / max(1, widest))  # every line fits the bar
    bar = np.full((line_h * len(lines) + 8 + (line_h * len(lines) + 8) % 2, 2 * w, 3), 24, np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(bar, text, (8, line_h * (i + 1) - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    1, cv2.LINE_AA)
    return np.concatenate([panels, bar], axis=0)


class _quiet_stderr:
    """Silence the process's stderr file descriptor (C libraries' prints) for a moment."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def open_writer(path: Path, fps: float, size: tuple[int, int]):
    """An OpenCV writer for ``path`` (codec chosen from the suffix, see ``CODECS``)."""
    cv2 = _cv2()
    fourcc = CODECS.get(path.suffix.lower())
    if fourcc is None:
        raise VideoInputError(f"cannot write {path.name!r}: the output must end in {' or '.join(CODECS)}")
    with _quiet_stderr():  # OpenCV prints a harmless "tag ... not supported ... fallback" line for WebM
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if not writer.isOpened():
        raise VideoInputError(f"OpenCV could not open {str(path)!r} for writing with codec {fourcc}")
    return writer


def make_pan_clip(image_path, out, frames: int = 48, size: tuple[int, int] = (320, 240), fps: float = 12.0) -> Path:
    """Write a clip of a camera panning (left to right, slowly zooming in) across a photo: a
    reproducible example video made from a bundled image. Written atomically; returns ``out``."""
    from PIL import Image

    out = Path(out)
    with Image.open(image_path) as im:
        photo = np.asarray(im.convert("RGB"))
    H, W = photo.shape[:2]
    w_out, h_out = size

    def frame(i: int) -> np.ndarray:
        t = i / max(1, frames - 1)
        ch = int(H * (0.8 - 0.2 * t))                         # zoom in from 80 % to 60 % of the height
        cw = min(W, int(ch * w_out / h_out))
        x0 = int((W - cw) * t)
        y0 = (H - ch) // 2
        return _cv2().resize(photo[y0:y0 + ch, x0:x0 + cw], (w_out, h_out), interpolation=_cv2().INTER_AREA)

    with _atomic_output(out) as tmp:
        writer = open_writer(tmp, fps, (w_out, h_out))
        try:
            for i in range(frames):
                writer.write(frame(i)[..., ::-1].copy())
        finally:
            writer.release()
    return out


class _atomic_output:
    """``with _atomic_output(dst) as tmp``: write ``tmp`` (same folder and suffix), renamed to ``dst``
    on success and removed on any error or interrupt, so no half-written file is ever left."""

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        self.tmp = self.dst.with_name(f".{self.dst.stem}.partial-{os.getpid()}-{id(self)}{self.dst.suffix}")

    def __enter__(self) -> Path:
        if not self.dst.parent.is_dir():
            raise VideoInputError(f"the output folder {str(self.dst.parent)!r} does not exist")
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.dst)
        else:
            self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- the run

@dataclass
class VideoResult:
    """What :func:`annotate_video` wrote and measured."""

    path: str
    frames: int                      # frames processed (and written)
    input: VideoInfo
    size: tuple[int, int]            # output (width, height)
    codec: str                       # fourcc written
    block: int                       # merge map after this block (0 = before the first)
    tokens_per_layer: list[int]      # tokens entering each block, then after the last (prefix tokens included)
    batch_frames: list[int] = field(default_factory=list)    # frames done after each batch
    tome_seconds: list[float] = field(default_factory=list)  # model time per batch, ToMe
    base_seconds: list[float] = field(default_factory=list)  # model time per batch, unpatched
    sources: list[torch.Tensor] | None = None                # per frame, when keep_sources
    texts: list[list[str]] | None = None                     # per frame's text lines, when keep_sources
    grid: tuple[int, int] = (0, 0)   # patch grid of the merge map (rows, cols)
    scale: int = 1                   # the model ran on a ``scale`` times larger input (visiontools.pictures)
    input_size: tuple[int, int] = (0, 0)  # the model's input (height, width) in this run

    @property
    def picture_text(self) -> str:
        """``" at a 64x64 input (16x16 patches, every block's r x4)"`` when the run was enlarged, else ``""``."""
        if self.scale == 1:
            return ""
        return (f" at a {self.input_size[0]}x{self.input_size[1]} input ({self.grid[0]}x{self.grid[1]} patches, "
                f"every block's r x{self.scale ** 2})")

    @property
    def fps_tome(self) -> float:
        """Model frames per second with ToMe over the whole clip."""
        return self.frames / sum(self.tome_seconds)

    @property
    def fps_base(self) -> float:
        """Model frames per second without ToMe over the whole clip."""
        return self.frames / sum(self.base_seconds)

    @property
    def tokens_after_block(self) -> int:
        return self.tokens_per_layer[self.block]


def _checked_setup(model: torch.nn.Module, src, dst, r, block: int | None, batch_size: int,
                   max_frames: int | None):
    """Check the settings of :func:`annotate_video` before any frame is read; returns
    ``(base model, ToMe model sharing its weights, depth, block, dst as a Path)``."""
    from visiontools.patches.timm import apply_tome

    if batch_size < 1:
        raise VideoInputError(f"the batch size (--batch-size) must be at least 1, got {batch_size}")
    if max_frames is not None and max_frames < 1:
        raise VideoInputError(f"the frame limit (--max-frames) must be at least 1, got {max_frames}")
    base = model.eval()
    try:
        tome = apply_tome(copy.copy(base), r=r)   # shares the weights; the original stays unpatched
    except TypeError as e:  # not a timm ViT ToMe can patch
        raise VideoInputError(str(e)) from None
    depth = len(model.blocks)
    block = depth if block is None else int(block)
    if not 0 <= block <= depth:
        raise VideoInputError(f"the block (--block) must be between 0 and {depth} (the model has {depth} blocks), got {block}")
    dst = Path(os.fspath(dst))
    if dst.suffix.lower() not in CODECS:
        raise VideoInputError(f"cannot write {dst.name!r}: the output must end in {' or '.join(CODECS)}")
    if dst.exists() and dst.resolve() == Path(os.fspath(src)).resolve():
        raise VideoInputError("the output would overwrite the input video; choose another --out")
    return base, tome, depth, block, dst


def _frame_batches(info: VideoInfo, max_frames: int | None, batch_size: int, display: tuple[int, int],
                   input_size: tuple[int, int]) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Batches of (display-size frame, model-size frame) pairs: each full-size frame is dropped once read."""
    cv2 = _cv2()
    batch = []
    for f in read_frames(info, max_frames):
        batch.append((cv2.resize(f, display, interpolation=cv2.INTER_AREA),
                      cv2.resize(f, input_size[::-1], interpolation=cv2.INTER_AREA)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _timed_forwards(base, tome, x: torch.Tensor, batch_index: int):
    """Run the unpatched and the ToMe model on ``x``, in alternating order from batch to batch (after an
    untimed warm-up of both on the first); returns ``({"base": s, "tome": s}, ToMe info with sources)``."""
    from visiontools.patches.timm import tome_forward

    if batch_index == 0:  # untimed warm-up of both models (first-call allocations, kernel choice)
        base(x)
        tome_forward(tome, x, trace_source=True)
    t = {}
    for which in (("base", "tome") if batch_index % 2 == 0 else ("tome", "base")):
        t0 = time.perf_counter()
        if which == "base":
            base(x)
        else:
            _, tinfo = tome_forward(tome, x, trace_source=True)
        t[which] = time.perf_counter() - t0
    return t, tinfo


def _frame_text(result: VideoResult, i: int, total: int | None, r, depth: int, prefix: int, batch_size: int,
                fps_t: float, fps_b: float) -> list[str]:
    """The two text lines under output frame ``i`` (1-based): frame number and tokens left, then model FPS."""
    scaled = f" (x{result.scale ** 2} at {result.input_size[0]}x{result.input_size[1]})" if result.scale > 1 else ""
    return [f"frame {i}{f'/{total}' if total else ''}   ToMe r={r}{scaled}: "
            f"{result.tokens_after_block} tokens after block {result.block}/{depth} "
            f"(of {result.tokens_per_layer[0]}, {f'{prefix} class' if prefix else 'no class token'})",
            f"model FPS (batch {batch_size}): ToMe {fps_t:.1f}   without ToMe {fps_b:.1f}"
            f"   ({fps_t / fps_b:.2f}x)"]


def _picture_models(base, tome, r, depth: int, min_grid: int):
    """``(base, ToMe model, k)`` for merge maps of at least ``min_grid`` patches a side: the models on a
    ``k`` times larger input, every block's r times ``k * k`` (:mod:`visiontools.pictures`); k=1: as given."""
    from visiontools.pictures import picture_model, picture_r

    pic, k = picture_model(base, min_grid)
    if k == 1:
        return base, tome, 1
    from visiontools.patches.timm import apply_tome

    return pic, apply_tome(copy.copy(pic), r=picture_r(r, depth, k)), k


def annotate_video(model: torch.nn.Module, src, dst, r=8, *, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   block: int | None = None, batch_size: int = 8, max_frames: int | None = None,
                   out_height: int = DEFAULT_HEIGHT, max_pixels: int = MAX_FRAME_PIXELS,
                   keep_sources: bool = False, min_grid: int = MIN_PICTURE_GRID,
                   progress: bool | Callable[[int, int | None], object] = False) -> VideoResult:
    """Write ``dst`` (.mp4 or .webm): every frame of ``src`` beside its ToMe merge map after ``block``
    (default: the last block; 0 = before the first) of an unpatched timm ViT ``model`` patched with
    ``r`` (any ``tome_r`` setting), with the frame number, tokens left and measured FPS with and
    without ToMe. ``min_grid``: a model whose patch grid is smaller runs on a ``k`` times larger input
    with every block's r times ``k * k`` (:func:`visiontools.pictures.picture_model`; 0: its own input),
    so that the map has at least ``min_grid`` patches a side; the FPS are measured on that input.
    ``keep_sources``: also return every frame's source map and text (for tests). ``mean``/``std``: the
    model's input normalisation. ``progress``: a tqdm bar, or a callable ``(frames done, total or None)``.
    ``dst`` appears only when the whole clip was written."""
    base, tome, depth, block, dst = _checked_setup(model, src, dst, r, block, batch_size, max_frames)
    info = probe_video(src, max_pixels)
    if getattr(model.patch_embed, "dynamic_img_size", False):
        raise VideoInputError("models with a dynamic image size are not supported: the merge map needs a fixed patch grid")
    base, tome, scale = _picture_models(base, tome, r, depth, min_grid)
    input_size = tuple(base.patch_embed.img_size)
    grid = tuple(base.patch_embed.grid_size)
    P = base.num_prefix_tokens
    fps_in = info.fps if 0 < info.fps <= 240 else 25.0
    total = info.frame_count or None
    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    display = display_size(info.width, info.height, out_height)
    result = VideoResult(str(dst), 0, info, (0, 0), CODECS[dst.suffix.lower()], block, [], grid=grid, scale=scale,
                         input_size=input_size, sources=[] if keep_sources else None,
                         texts=[] if keep_sources else None)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="frame", desc=f"ToMe video {Path(info.path).name}")
    report = progress if callable(progress) else None

    try:
        with _atomic_output(dst) as tmp, torch.inference_mode():
            writer = None
            try:
                for bi, frames in enumerate(_frame_batches(info, max_frames, batch_size, display, input_size)):
                    x = model_input([small for _, small in frames], input_size, mean, std)
                    t, tinfo = _timed_forwards(base, tome, x, bi)
                    result.base_seconds.append(t["base"])
                    result.tome_seconds.append(t["tome"])
                    result.tokens_per_layer = list(tinfo.tokens_per_layer)
                    n_done = result.frames + len(frames)
                    result.batch_frames.append(n_done)
                    fps_t = n_done / sum(result.tome_seconds)
                    fps_b = n_done / sum(result.base_seconds)
                    for k, (view, _) in enumerate(frames):
                        src_map = (torch.arange(grid[0] * grid[1]) if block == 0
                                   else tinfo.layer_sources[block - 1][k])
                        lines = _frame_text(result, result.frames + k + 1, total, r, depth, P, batch_size, fps_t, fps_b)
                        if keep_sources:
                            result.sources.append(src_map.clone())
                            result.texts.append(lines)
                        out = annotate_frame(view, src_map, grid, lines)
                        if writer is None:
                            result.size = (out.shape[1], out.shape[0])
                            writer = open_writer(tmp, fps_in, result.size)
                        if (out.shape[1], out.shape[0]) != result.size:  # OpenCV would drop it silently
                            raise RuntimeError(f"frame {result.frames + k + 1} is {out.shape[1]}x{out.shape[0]}, "
                                               f"the clip {result.size[0]}x{result.size[1]}")
                        writer.write(np.ascontiguousarray(out[..., ::-1]))
                    result.frames = n_done
                    if bar is not None:
                        bar.update(len(frames))
                    if report:
                        report(n_done, total)
            finally:
                if writer is not None:
                    writer.release()
    finally:
        if bar is not None:
            bar.close()
    return result


# ----------------------------------------------------------------------------------------------- CLI

def load_model(name: str, pretrained: bool = False) -> tuple[torch.nn.Module, tuple, tuple, str]:
    """``(unpatched model in eval mode, mean, std, description)`` from ``visiontools.models.load``: a
    shipped checkpoint name (``cifar10_cct``), a visiontools ``.safetensors`` file, or a timm ViT name."""
    from visiontools import models

    model, desc = models.load(name, pretrained=pretrained, tome=False)
    what = f"{name} ({desc['model']})" if models.is_checkpoint(name) else \
        f"timm {name} ({'pretrained' if pretrained else 'random weights'})"
    return model, tuple(desc["mean"]), tuple(desc["std"]), what


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``visiontools video``."""
    from visiontools.tome.r_text import r_argument

    p.add_argument("--in", dest="src", required=True, metavar="VIDEO",
                   help="input video (MP4, WebM, MKV, AVI, MOV; any codec this OpenCV build decodes)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="annotated video to write: .mp4 (MPEG-4 Part 2, plays in VLC/ffplay, not in browsers) "
                        "or .webm (VP8, plays in browsers); written whole or not at all")
    p.add_argument("--model", default=DEFAULT_CHECKPOINT,
                   help="a shipped checkpoint (e.g. cifar10_vit), a visiontools .safetensors file or a timm ViT name "
                        "(random weights unless --pretrained)")
    p.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs a network)")
    p.add_argument("--r", type=r_argument, default=None, metavar="R",
                   help="ToMe: tokens merged per block (16), r,inflection (16,-0.5) or a per-layer list; default: the "
                        "checkpoint's recommended r (the r it was trained with, or its card's choice: "
                        f"{default_r_text()} for {DEFAULT_CHECKPOINT})")
    p.add_argument("--block", type=int, default=None,
                   help="draw the merge map after this block (0 = before the first); default: the last block")
    p.add_argument("--min-grid", type=int, default=MIN_PICTURE_GRID, metavar="N",
                   help="a model with a smaller patch grid runs on a k times larger input (every block's r x k*k) "
                        "so that the merge map has at least NxN patches, as in the ToMe paper's figures; "
                        "0: the model's own input")
    p.add_argument("--batch-size", type=int, default=8, help="frames per forward pass")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames (None: the whole clip)")
    p.add_argument("--height", type=int, default=DEFAULT_HEIGHT,
                   help="height of each output panel (frame and merge map side by side) in pixels")
    p.add_argument("--threads", type=int, default=None, help="torch and OpenCV CPU threads (default: their choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad option values of ``visiontools video`` (one-line :class:`VideoInputError`) before a
    video is opened; :func:`annotate_video` checks --batch-size, --max-frames and --block."""
    if args.height < 16:
        raise VideoInputError(f"--height must be at least 16, got {args.height}")
    if args.min_grid < 0:
        raise VideoInputError(f"--min-grid must be at least 0, got {args.min_grid}")
    if args.threads is not None and args.threads < 1:
        raise VideoInputError(f"--threads must be at least 1, got {args.threads} (or leave it out)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``visiontools video``. Bad inputs raise ``ValueError``s (:class:`VideoInputError`,
    an unknown model or r) or ``FileNotFoundError``, which ``visiontools.cli`` prints as one line
    ``visiontools: error: ...`` with exit status 2; an interrupted run writes no output."""
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
        _cv2().setNumThreads(args.threads)
    probe_video(args.src)  # before loading a model: a bad file fails in a second
    if args.r is None:
        from visiontools.models import recommended_r
        args.r = recommended_r(args.model)
    model, mean, std, desc = load_model(args.model, args.pretrained)
    res = annotate_video(model, args.src, args.out, args.r, mean=mean, std=std, block=args.block,
                         batch_size=args.batch_size, max_frames=args.max_frames, out_height=args.height,
                         progress=not args.no_progress, min_grid=args.min_grid)
    print(f"wrote {res.path}: {res.frames} frames, {res.size[0]}x{res.size[1]}, {res.codec}; {desc}, r={args.r}"
          f"{res.picture_text}: "
          f"{res.tokens_after_block} of {res.tokens_per_layer[0]} tokens after block {res.block}; model FPS "
          f"ToMe {res.fps_tome:.1f}, without {res.fps_base:.1f} ({res.fps_tome / res.fps_base:.2f}x), "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads")
    from visiontools.timing import busy_machine_note

    note = busy_machine_note([res.fps_tome / res.fps_base], next(model.parameters()).device)
    if note:
        print(note)
    return 0
