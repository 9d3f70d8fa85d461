"""Video encoding throughput: `encode_records` on video files vs the bare timm forward.

Writes a few H.264 videos on the spot (nothing is downloaded), then measures, on the same
sampled frames and the same randomly initialised timm encoder:

- bare: the encoder's forward alone over pixels already decoded and preprocessed, in
  batches of --batch-size frames (the ceiling: what the frozen encoder costs);
- ours: `flamingo_cli.inference.encoding.encode_records` from the files: decoding and frame
  sampling in a DataLoader worker, preprocessing, the forward, writing the feature files;
- decode: decoding and sampling alone.

It checks that ours gives the bare forward's features, and prints frames/s and the ratio
ours / bare (1.0 = decoding entirely hidden behind the encoder).

    .venv/bin/python benchmarks/video_encode.py [--encoder vit_base_patch32_clip_224] [--videos 4]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_video(path: Path, seconds: float, fps: int, size=(320, 240)) -> None:
    """A moving gradient, so the codec has real work (H.264, as most video datasets ship)."""
    import av

    w, h = size
    x = np.arange(w)[None, :, None]
    y = np.arange(h)[:, None, None]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(int(seconds * fps)):
            rgb = np.concatenate([(x + 3 * t) % 256 + 0 * y, (y + 2 * t) % 256 + 0 * x, (x + y + t) % 256], axis=2)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")))
        out.mux(stream.encode())


def main() -> None:
    import timm

    from flamingo_cli.formats.artifacts import load_ref
    from flamingo_cli.inference.encoding import encode_records
    from flamingo_cli.inference.video import EVAL_SAMPLING, read_video
    from flamingo_cli.model.config import EncoderConfig
    from flamingo_cli.model.vision_encoder import VisionEncoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="vit_base_patch32_clip_224")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = VisionEncoder(EncoderConfig(name=args.encoder, random_init=True),
                            timm.create_model(args.encoder, pretrained=False))
    sampling = EVAL_SAMPLING
    print(f"encoder {args.encoder}, {args.videos} videos of {args.seconds:g} s at 24 FPS (320x240 H.264), "
          f"clips of {sampling.frames} frames at {sampling.fps:g} FPS, batches of {args.batch_size} frames, "
          f"{torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"v{i}.mp4" for i in range(args.videos)]
        for path in paths:
            write_video(path, args.seconds, 24)
        frames = args.videos * sampling.frames

        start = time.perf_counter()
        clips = [read_video(p, sampling)[0] for p in paths]
        decode_s = time.perf_counter() - start
        transform = encoder.transform()
        pixels = torch.stack([transform(f) for clip in clips for f in clip])
        encoder(pixels[: args.batch_size])  # warm-up
        start = time.perf_counter()
        bare = torch.cat([encoder(chunk)[:, 0] for chunk in pixels.split(args.batch_size)])
        bare_s = time.perf_counter() - start

        records = [{"id": str(p), "video": str(p)} for p in paths]
        start = time.perf_counter()
        batches = list(encode_records(encoder, "bench", records, root=Path(tmp) / "cache",
                                      batch_size=args.batch_size, workers=1, sampling=sampling))
        ours_s = time.perf_counter() - start
        ours = torch.cat([load_ref(r["features"])[0] for batch in batches for r in batch])
    torch.testing.assert_close(ours, bare, rtol=0, atol=1e-4)
    print(f"bare timm forward   {frames / bare_s:8.1f} frames/s")
    print(f"ours, from files    {frames / ours_s:8.1f} frames/s   (decode, sample, preprocess, encode, write)")
    print(f"decode + sample     {frames / decode_s:8.1f} frames/s   (alone, one process)")
    print(f"ours / bare         {bare_s / ours_s:8.2f}")


if __name__ == "__main__":
    main()
