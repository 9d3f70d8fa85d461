"""Video in, frames out: decoding through PyAV and the paper's frame sampling.

PyAV's wheels carry their own FFmpeg, so any container and codec FFmpeg reads (mp4/H.264,
webm/VP9, mkv, avi, animated GIF, ...) decodes on a machine with no system packages.

Sampling (paper App. B.1.2): a clip is `frames` frames `1/fps` seconds apart, each the frame
on screen at its time (a frame shown across several sample times repeats). Training takes 8
frames at 1 FPS from a seeded random window; evaluation 30 at 3 FPS from the window centred in
the video; `uniform` spreads the frames evenly over the whole video instead. A clip always has
`frames` frames, so clips batch and meet the same temporal embeddings: a video shorter than
the window starts it at its first frame, and sample times past its end show its last frame,
as a player shows when it stops.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

from ..formats.artifacts import ArtifactError, read_file

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv"}
CLIPS = ("center", "random", "uniform")


@dataclass(frozen=True)
class FrameSampling:
    frames: int = 30
    fps: float = 3.0
    clip: str = "center"  # "center" | "random" (a window seeded by `seed` and the video's content) | "uniform"
    seed: int = 0

    def __post_init__(self):
        if self.frames < 1 or self.fps <= 0 or self.clip not in CLIPS:
            raise ValueError(f"frame sampling needs frames >= 1, fps > 0 and clip in {CLIPS}, got {self}")

    def key(self) -> str:
        """What the sampled frames depend on besides the video's bytes: part of the cache key."""
        key = f"frames={self.frames},fps={self.fps:g},clip={self.clip}"
        return key + f",seed={self.seed}" if self.clip == "random" else key


TRAIN_SAMPLING = FrameSampling(frames=8, fps=1.0, clip="random")
EVAL_SAMPLING = FrameSampling()


class Clip(list):
    """A decoded clip: its RGB PIL frames, in order (told apart from an image's raw bytes)."""


def is_video_file(path: str | Path) -> bool:
    """A file a stage treats as a video: a video container's suffix, or an animated GIF."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix != ".gif":
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            return bool(getattr(image, "is_animated", False))
    except (OSError, ValueError):
        return False  # read_image says what is wrong with it


def sample_indices(times: list[float], sampling: FrameSampling, content: str = "") -> list[int]:
    """Which frames (indices into `times`, the presentation times in seconds, ascending) make
    the clip. `content` (the video's digest) seeds a random window, so a video gets the same
    clip wherever it is stored."""
    n = len(times)
    if sampling.clip == "uniform":
        return [min(int((i + 0.5) * n / sampling.frames), n - 1) for i in range(sampling.frames)]
    start, end = times[0], times[-1]
    span = (sampling.frames - 1) / sampling.fps
    if end - start <= span:
        offset = 0.0
    elif sampling.clip == "center":
        offset = (end - start - span) / 2
    else:
        rng = random.Random(int(hashlib.sha256(f"{sampling.seed}\0{content}".encode()).hexdigest()[:16], 16))
        offset = rng.uniform(0, end - start - span)
    # The frame on screen at t: the last one shown at or before it (a little slack for rounding).
    return [max(bisect.bisect_right(times, start + offset + i / sampling.fps + 1e-6) - 1, 0)
            for i in range(sampling.frames)]


def read_video(path: str | Path, sampling: FrameSampling = EVAL_SAMPLING, *, data: bytes | None = None,
               content: str = "", max_pixels: int | None = None, span: tuple[float, float] | None = None):
    """(RGB PIL frames, their times in seconds from the video's start) of the sampled clip,
    taken from the frames shown between span's start and end (seconds) when given: a
    benchmark's segment. Any failure (no such file, empty, not a video, no video stream, corrupt
    or truncated data, frames over `max_pixels`, no frame in the span) is one ArtifactError
    naming the file."""
    import av

    data = read_file(path) if data is None else data
    if not data:
        raise ArtifactError(f"{path}: empty file, not a video")
    try:
        times = _presentation_times(data, path)
        if not times:
            raise ArtifactError(f"{path}: the video stream has no frames")
        inside = list(range(len(times)))
        if span is not None:
            inside = [i for i, t in enumerate(times) if span[0] - 1e-6 <= t - times[0] <= span[1] + 1e-6]
            if not inside:
                raise ArtifactError(f"{path}: no frame between {span[0]:g} s and {span[1]:g} s (the video's last "
                                    f"frame is at {times[-1] - times[0]:.2f} s)")
        wanted = [inside[j] for j in sample_indices([times[i] for i in inside], sampling, content)]
        frames = _decode(data, path, sorted(set(wanted)), max_pixels)
    except av.FFmpegError as e:
        raise ArtifactError(f"{path}: cannot decode video ({_reason(e)})") from None
    if len(frames) < len(set(wanted)):
        raise ArtifactError(f"{path}: cannot decode video (it ends after {len(frames)} of the frames its "
                            f"container lists: truncated?)")
    return [frames[i] for i in wanted], [times[i] - times[0] for i in wanted]


def _video_stream(container, path):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise ArtifactError(f"{path}: no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _open(data: bytes, path):
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        raise ArtifactError(f"{path}: not a video ({_reason(e)})") from None


def _presentation_times(data: bytes, path) -> list[float]:
    """Every frame's presentation time, from the packets alone (nothing decoded)."""
    with _open(data, path) as container:
        stream = _video_stream(container, path)
        base = float(stream.time_base) if stream.time_base else 0.0
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        stamps = [p.pts for p in container.demux(stream) if p.size]
    if base and all(s is not None for s in stamps):
        return sorted(s * base for s in stamps)
    return [i / rate for i in range(len(stamps))]  # no timestamps (some AVI files): the nominal rate


def _decode(data: bytes, path, indices: list[int], max_pixels: int | None) -> dict:
    """The frames at these presentation-order positions, as RGB PIL images."""
    out, wanted, last = {}, set(indices), indices[-1]
    with _open(data, path) as container:
        stream = _video_stream(container, path)
        for i, frame in enumerate(container.decode(stream)):
            if i == 0 and max_pixels is not None and frame.width * frame.height > max_pixels:
                raise ArtifactError(f"{path}: frames of {frame.width}x{frame.height} = {frame.width * frame.height:,} "
                                    f"pixels, over the limit of {max_pixels:,} (encode --max-pixels)")
            if i in wanted:
                out[i] = frame.to_image().convert("RGB")
            if i >= last:
                break
    return out


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e).splitlines()[0] if str(e) else type(e).__name__
    return str(text)[:120]
