"""Media in, tensors out: decoding images (videos: video.py), and resolving a prompt's media
entries to visual tokens.

A media entry is a visual-token reference, a feature reference, or an image or video path
(see formats/artifacts.py). Resolved visual tokens are memoised per entry, so a support
image shared by many prompts is loaded and resampled once.
"""
from __future__ import annotations

import contextlib
import io
import re
from collections import OrderedDict
from pathlib import Path

import torch

from ..formats.artifacts import VISUAL, ArtifactError, digest_bytes, is_ref, load_ref, read_file, split_ref
from .video import EVAL_SAMPLING, VIDEO_SUFFIXES, FrameSampling, is_video_file, read_video

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# PIL's own warning threshold (about 9459 x 9459): far beyond any encoder's input, far below
# what a forged header can claim. encode --max-pixels changes it.
MAX_PIXELS = 89_478_485


def read_image(path: str | Path, data: bytes | None = None, *, max_pixels: int | None = MAX_PIXELS):
    """An RGB PIL image (RGBA where it has transparency: the encoder's transform flattens it as its
    weights expect); any failure is one ArtifactError naming the file. An image whose header
    claims more than `max_pixels` pixels (None: no limit) is refused before it is decoded, so a
    decompression bomb cannot take the machine's memory."""
    from PIL import Image, UnidentifiedImageError

    data = read_file(path) if data is None else data
    try:
        with _without_pil_limit(), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ArtifactError(f"{path}: the image claims {width}x{height} = {width * height:,} pixels, over the "
                                    f"limit of {max_pixels:,} (encode --max-pixels)")
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            return image.convert("RGBA" if has_alpha else "RGB")
    except UnidentifiedImageError:
        raise ArtifactError(f"{path}: not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "it", str(e).splitlines()[0] if str(e) else "")
        raise ArtifactError(f"{path}: cannot decode image ({reason[:120] or type(e).__name__})") from None


@contextlib.contextmanager
def _without_pil_limit():
    """PIL's global pixel guard off while read_image applies its own (with the file's name)."""
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def find_media(directory: Path) -> list[Path]:
    """Image and video files below a directory, recursively, in sorted order."""
    suffixes = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def media_record(path: str) -> dict:
    """The record of a media file named on a command line: a `video` or an `image`."""
    return {"id": path, "video" if is_video_file(path) else "image": path}


class MediaFiles(torch.utils.data.Dataset):
    """Reads, hashes, decodes, samples and preprocesses media in DataLoader workers, so decoding
    overlaps the encoder. Each item is ("image" | "video", path, span: a video's (start, end) in
    seconds, or None); its pixels are (frames, 3, H, W), one frame for an image. A file already in
    the cache is hashed but not decoded: a video's cache key is its bytes, span and sampling."""

    def __init__(self, items: list[tuple[str, str]], transform, is_cached, max_pixels: int | None = MAX_PIXELS,
                 sampling: FrameSampling = EVAL_SAMPLING):
        self.items, self.transform, self.is_cached = items, transform, is_cached
        self.max_pixels, self.sampling = max_pixels, sampling

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        kind, path, span = self.items[i]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            return {"index": i, "error": f"{path}: {e.strerror or 'cannot read'}"}
        digest = digest_bytes(data)
        key = digest if kind == "image" else f"{digest}#{self.sampling.key()}"
        if span is not None:
            key += f",span={span[0]:g}-{span[1]:g}"
        if self.is_cached(key):
            return {"index": i, "digest": key, "pixels": None}
        try:
            if kind == "image":
                pixels = self.transform(read_image(path, data, max_pixels=self.max_pixels)).unsqueeze(0)
                times = [0.0]
            else:
                frames, times = read_video(path, self.sampling, data=data, content=digest, max_pixels=self.max_pixels,
                                           span=span)
                pixels = torch.stack([self.transform(frame) for frame in frames])
        except ArtifactError as e:
            return {"index": i, "error": str(e)}
        return {"index": i, "digest": key, "pixels": pixels, "times": times}


def pad_media(media: list[torch.Tensor]) -> torch.Tensor | None:
    """Per-sequence media tensors [(m_i, *shape)] (visual tokens or features) -> (b, max m_i, *shape),
    zero padded. Padding is never attended: a token's image index never exceeds its own
    sequence's count."""
    most = max(m.shape[0] for m in media)
    if most == 0:
        return None
    first = next(m for m in media if m.shape[0])
    out = first.new_zeros(len(media), most, *first.shape[1:])
    for i, m in enumerate(media):
        out[i, : m.shape[0]] = m
    return out


class MediaResolver:
    """Turns media entries into a model's visual tokens (l, d), checking identities. Video paths
    are sampled by `sampling` (the paper's evaluation sampling by default)."""

    def __init__(self, model, *, load_encoder=None, device: str = "cpu", memo: int = 1024,
                 sampling: FrameSampling = EVAL_SAMPLING):
        self.model = model
        self.sampling = sampling
        self.load_encoder = load_encoder
        self.device = device
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memo_size = memo
        self.inline: dict[str, torch.Tensor] = {}  # in-memory images by entry, until forgotten
        self._encoder = model.encoder
        self._transform = None

    def _encode(self, path: str) -> torch.Tensor:
        if is_video_file(path):
            frames, _ = read_video(path, self.sampling)
        else:
            frames = [read_image(path)]
        return self._features(frames, path)

    def _features(self, frames: list, what: str) -> torch.Tensor:
        """PIL frames (one for an image) -> features (f, n, d), the encoder loaded on first use."""
        if self._encoder is None:
            if self.load_encoder is None:
                raise ArtifactError(f"{what}: media to encode need the vision encoder, which is not loaded")
            self._encoder = self.load_encoder().to(self.device)
        if self._transform is None:
            self._transform = self._encoder.transform()
        pixels = torch.stack([self._transform(frame) for frame in frames]).to(self.device)
        return self._encoder(pixels.unsqueeze(0))[0]

    def add_inline(self, image) -> str:
        """A PIL image in memory as a media entry (named by its pixels), its visual tokens computed
        now and kept in `inline` until forget_inline; prompts then name it like any other entry."""
        entry = "inline:" + digest_bytes(f"{image.mode}{image.size}".encode() + image.tobytes())[:32]
        if entry not in self.inline:
            with torch.no_grad():
                self.inline[entry] = self.model.resample(self._features([image], entry).unsqueeze(0))[0]
        return entry

    def forget_inline(self, entries) -> None:
        for entry in entries:
            self.inline.pop(entry, None)

    def visuals(self, entries: list[str]) -> torch.Tensor:
        """A prompt's media entries -> (m, latents, d); m may be 0."""
        if not entries:
            r = self.model.config.resampler
            return torch.zeros(0, r.num_latents, r.dim, device=self.device)
        return torch.stack([self.visual(e) for e in entries])

    def visual(self, entry: str) -> torch.Tensor:
        if entry in self.inline:
            return self.inline[entry]
        if entry in self.memo:
            self.memo.move_to_end(entry)
            return self.memo[entry]
        model = self.model
        if is_ref(entry) and split_ref(entry)[1] == VISUAL:
            tokens, _ = load_ref(entry, encoder=model.encoder_id, checkpoint=model.checkpoint_id)
            tokens = tokens.to(self.device)
        else:
            if is_ref(entry):
                features, _ = load_ref(entry, encoder=model.encoder_id)
                features = features.to(self.device)
            else:
                features = self._encode(entry)
            if features.ndim != 3 or features.shape[-1] != model.config.resampler.dim:
                raise ArtifactError(f"{entry}: features must be (frames, tokens, {model.config.resampler.dim}), "
                                    f"got {tuple(features.shape)}")
            with torch.no_grad():
                tokens = model.resample(features.unsqueeze(0))[0]
        expected = (model.config.resampler.num_latents, model.config.resampler.dim)
        if tuple(tokens.shape) != expected:
            raise ArtifactError(f"{entry}: visual tokens must be {expected}, got {tuple(tokens.shape)}")
        self.memo[entry] = tokens
        if len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)
        return tokens


def load_for_inference(directory: str | Path, device: str = "cpu", dtype: str | None = None,
                       device_map: str | dict | None = None):
    """A checkpoint as the stages use it: (model in eval mode, MediaResolver). The encoder is
    loaded only when a media entry is an image or video path rather than features or visual
    tokens; a video path is sampled as evaluation samples (30 frames at 3 FPS, centred).

    dtype (float32, bfloat16, float16) holds the whole model in it: the LM's weights are loaded
    in it, the new parts cast once, so no call re-casts weights (as autocast does each call). The
    encoder stays float32, as `encode` runs it, so features match those encode writes.

    device_map spreads an LM too large for one device across several (see
    formats.checkpoint.load_lm); `device` is then the input embedding's, where inputs go."""
    from ..formats.checkpoint import DTYPES, load_checkpoint, load_checkpoint_encoder

    model = load_checkpoint(directory, with_encoder=False, lm_dtype=dtype, device_map=device_map)
    if device_map is None:
        model = model.to(device) if dtype is None else model.to(device, DTYPES[dtype])
    else:  # accelerate placed the LM: only the new parts are cast, where they already are
        for part in (model.resampler, model.xattn, model.new_tokens):
            part.to(DTYPES[dtype or "float32"])
        device = str(model.input_device)
    model.eval()
    return model, MediaResolver(model, load_encoder=lambda: load_checkpoint_encoder(directory)[0], device=device)
