import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from flamingo_cli.model.config import FlamingoConfig, ResamplerConfig, XAttnConfig  # noqa: E402
from flamingo_cli.tiny import save_tiny_lm  # noqa: E402

VISUAL_DIM = 32


def hub_repo(cache, repo: str, files, revisions=("main",), commit: str = "0123456789abcdef" * 2 + "01234567"):
    """A repo in huggingface_hub's on-disk cache layout, as it reads it offline: refs/REVISION
    holds the commit, snapshots/COMMIT/ the files (a copy of the directory `files`)."""
    import shutil
    from pathlib import Path

    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for revision in revisions:
        (root / "refs" / revision).write_text(commit)
    shutil.copytree(files, root / "snapshots" / commit, dirs_exist_ok=True)
    return root / "snapshots" / commit


def toy_shot_records(count: int = 3) -> list[dict]:
    """Two-shot caption prompts over the toy world's demo images, for the bundled model."""
    from pathlib import Path

    toy = Path(__file__).resolve().parents[1] / "examples" / "toy"
    shots = [f"{toy}/shots/shot-0{i}.png" for i in range(2)]
    prompt = ("<image>Output: a pink diamond<|endofchunk|><image>Output: a cyan triangle<|endofchunk|>"
              "<image>Output:")
    return [{"id": image.stem, "prompt": prompt, "media": [*shots, str(image)]}
            for image in sorted((toy / "images").glob("*.png"))[:count]]


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory):
    """family -> directory of a tiny random LM with its locally trained tokenizer (built once)."""
    root = tmp_path_factory.mktemp("lms")
    made = {}

    def get(family: str = "llama"):
        if family not in made:
            made[family] = save_tiny_lm(root / family, family)
        return made[family]

    return get


def tiny_config(lm_path="", **xattn) -> FlamingoConfig:
    config = FlamingoConfig(
        resampler=ResamplerConfig(dim=VISUAL_DIM, depth=2, heads=2, dim_head=16, num_latents=4, max_frames=4),
        xattn=XAttnConfig(every=2, heads=2, dim_head=16, **xattn),
    )
    config.lm.path = str(lm_path)
    return config


@pytest.fixture
def make_model(lm_dir):
    """Build a Flamingo around a freshly loaded tiny LM (no encoder: tests feed visual tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flamingo_cli.model.flamingo import Flamingo

    def make(family="llama", *, gates=0.0, seed=0, **xattn):
        path = lm_dir(family)
        lm = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(seed)
        model = Flamingo(tiny_config(path, **xattn), lm, tokenizer)
        set_gates(model, gates)
        return model.eval()

    return make


def set_gates(model, value: float) -> None:
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def add_bos(tokenizer) -> None:
    """The tiny tokenizer adds no special tokens; make it begin every text with <s>, as LLaMA's does."""
    from tokenizers import processors

    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])


def visual_tokens(batch: int, images: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, images, 4, VISUAL_DIM, generator=g)


def ids_for(model, text: str) -> torch.Tensor:
    return model.tokenizer(text, return_tensors="pt").input_ids


def cache_of(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values")


# Frame colours far apart in RGB, so a decoded frame names its index even through lossy codecs
# and GIF's palette.
FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
                 (255, 255, 255), (0, 0, 0)]
CODECS = {"mp4": ("libx264", "yuv420p"), "webm": ("libvpx-vp9", "yuv420p"), "mkv": ("ffv1", "yuv420p"),
          "avi": ("mpeg4", "yuv420p"), "mov": ("mjpeg", "yuvj420p"), "gif": ("gif", "rgb8")}


def write_video(path, frames: list[int], fps: float = 4, size=(64, 48)) -> None:
    """A video whose frame i is solid FRAME_COLOURS[frames[i]], in the container its suffix names."""
    import fractions

    import av
    import numpy as np

    codec, pix_fmt = CODECS[str(path).rsplit(".", 1)[-1]]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = *size, pix_fmt
        for index in frames:
            pixels = np.full((size[1], size[0], 3), FRAME_COLOURS[index], np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(stream.encode())


def frame_index(image) -> int:
    """Which FRAME_COLOURS entry a decoded frame shows."""
    r, g, b = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return min(range(len(FRAME_COLOURS)),
               key=lambda i: sum((x - y) ** 2 for x, y in zip((r, g, b), FRAME_COLOURS[i])))
