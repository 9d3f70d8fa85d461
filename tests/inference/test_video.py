"""Video decoding through PyAV and the paper's frame sampling, on files the tests write."""
from __future__ import annotations

import pytest
import torch
from conftest import CODECS, frame_index, write_video

from flamingo_cli.formats.artifacts import ArtifactError
from flamingo_cli.inference.video import (EVAL_SAMPLING, TRAIN_SAMPLING, FrameSampling, is_video_file, read_video,
                                          sample_indices)

FRAMES = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]  # 12 frames at 4 FPS: 3 s, frame i shown from i/4 s


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_every_container_decodes_to_the_frames_on_screen_at_the_sample_times(tmp_path, suffix):
    path = tmp_path / f"clip.{suffix}"
    write_video(path, FRAMES, fps=4)
    assert is_video_file(path)
    # 5 frames 0.5 s apart span 2 s; the centred window of the 2.75 s video starts at 0.375 s.
    frames, times = read_video(path, FrameSampling(frames=5, fps=2, clip="center"))
    assert [frame_index(f) for f in frames] == [FRAMES[i] for i in (1, 3, 5, 7, 9)]
    assert times == pytest.approx([0.25, 0.75, 1.25, 1.75, 2.25])


def test_a_still_gif_is_an_image_and_an_animated_one_a_video(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "still.gif")
    write_video(tmp_path / "moving.gif", [0, 1])
    assert not is_video_file(tmp_path / "still.gif") and is_video_file(tmp_path / "moving.gif")


def test_the_sampler_by_hand():
    times = [i / 10 for i in range(100)]  # 10 FPS, 9.9 s
    assert TRAIN_SAMPLING == FrameSampling(frames=8, fps=1, clip="random")
    assert EVAL_SAMPLING == FrameSampling(frames=30, fps=3, clip="center")
    # Centred: the 9.67 s window of 30 frames at 3 FPS starts at (9.9 - 29/3) / 2 = 0.117 s.
    assert sample_indices(times, EVAL_SAMPLING)[:4] == [1, 4, 7, 11]
    assert sample_indices(times, EVAL_SAMPLING)[-1] == 97
    # Random: the seed and the content pick the start; the clip stays inside the video, 1 s apart.
    clips = {(seed, content): sample_indices(times, FrameSampling(8, 1, "random", seed), content)
             for seed in (0, 1) for content in ("a", "b")}
    for clip in clips.values():
        assert len(clip) == 8 and clip[0] >= 0 and clip[-1] <= 99
        assert all(b - a in (9, 10, 11) for a, b in zip(clip, clip[1:]))
    assert len(set(map(tuple, clips.values()))) >= 3  # both the seed and the content move it
    assert sample_indices(times, FrameSampling(8, 1, "random", 0), "a") == clips[0, "a"]  # deterministic
    # Uniform: the middle of each of 5 equal parts.
    assert sample_indices(times, FrameSampling(5, 1, "uniform")) == [10, 30, 50, 70, 90]


def test_a_short_video_fills_its_clip_with_its_last_frame():
    times = [0.0, 0.5, 1.0]  # 2 FPS, 3 frames
    assert sample_indices(times, FrameSampling(frames=8, fps=1)) == [0, 2, 2, 2, 2, 2, 2, 2]
    assert sample_indices(times, FrameSampling(frames=6, fps=4, clip="random")) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(times, FrameSampling(frames=6, fps=1, clip="uniform")) == [0, 0, 1, 1, 2, 2]
    assert sample_indices([0.0], EVAL_SAMPLING) == [0] * 30


def test_the_cache_key_names_what_the_frames_depend_on():
    assert EVAL_SAMPLING.key() == "frames=30,fps=3,clip=center"
    assert FrameSampling(8, 1, "random", seed=3).key() == "frames=8,fps=1,clip=random,seed=3"
    assert FrameSampling(8, 1, "center", seed=3).key() == FrameSampling(8, 1, "center").key()  # unseeded
    with pytest.raises(ValueError):
        FrameSampling(frames=0)


def _audio_only(path):
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())


def bad_videos(root):
    """Each: (file, the one-line error it gives)."""
    write_video(root / "good.mp4", FRAMES)
    data = (root / "good.mp4").read_bytes()
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "noise.webm").write_bytes(bytes(range(256)) * 8)
    _audio_only(root / "sound.mkv")
    return {
        "empty.mp4": "empty.mp4: empty file, not a video",
        "truncated.mp4": "truncated.mp4: not a video (",
        "noise.webm": "noise.webm: not a video (",
        "sound.mkv": "sound.mkv: no video stream (streams: audio)",
        "missing.mp4": "missing.mp4: no such file",
    }


def test_bad_videos_are_one_error_naming_the_file(tmp_path):
    for name, message in bad_videos(tmp_path).items():
        with pytest.raises(ArtifactError) as e:
            read_video(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / message)), str(e.value)


def test_a_frame_over_the_pixel_limit_is_refused(tmp_path):
    write_video(tmp_path / "big.mp4", [0, 1], size=(64, 48))
    with pytest.raises(ArtifactError, match=r"big.mp4: frames of 64x48 = 3,072 pixels, over the limit of 3,000"):
        read_video(tmp_path / "big.mp4", max_pixels=3000)


def test_video_features_are_each_frame_through_the_encoder_on_its_own(tmp_path):
    """encode_records on a video = the bare encoder on each sampled frame, stacked."""
    import timm
    from PIL import Image

    from flamingo_cli.formats.artifacts import load_ref
    from flamingo_cli.inference.encoding import encode_records
    from flamingo_cli.model.config import EncoderConfig
    from flamingo_cli.model.vision_encoder import VisionEncoder

    torch.manual_seed(0)
    config = EncoderConfig(name="test_vit", image_size=32, random_init=True)
    encoder = VisionEncoder(config, timm.create_model("test_vit", img_size=32, num_classes=0))
    write_video(tmp_path / "clip.webm", FRAMES, fps=4)
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "blue.png")
    sampling = FrameSampling(frames=6, fps=2)
    records = [{"id": "v", "video": str(tmp_path / "clip.webm")}, {"id": "i", "image": str(tmp_path / "blue.png")}]
    (batch,) = encode_records(encoder, "test", records, root=tmp_path / "cache", batch_size=4, workers=0,
                              sampling=sampling)
    video, _ = load_ref(batch[0]["features"])
    image, _ = load_ref(batch[1]["features"])
    frames, _ = read_video(tmp_path / "clip.webm", sampling)
    transform = encoder.transform()
    one_by_one = torch.cat([encoder(transform(f).unsqueeze(0))[:, 0] for f in frames])
    assert video.shape == (6, *one_by_one.shape[1:])
    torch.testing.assert_close(video, one_by_one, rtol=0, atol=1e-5)
    assert image.shape == (1, *one_by_one.shape[1:])
    # Another sampling of the same bytes is another cache entry.
    (again,) = encode_records(encoder, "test", records[:1], root=tmp_path / "cache", workers=0,
                              sampling=FrameSampling(frames=3, fps=1))
    assert again[0]["features"] != batch[0]["features"] and load_ref(again[0]["features"])[0].shape[0] == 3
    # A segment is its own clip, and its own cache entry.
    segment = {"id": "s", "video": str(tmp_path / "clip.webm"), "start": 1.0, "end": 2.0}
    (cut,) = encode_records(encoder, "test", [segment], root=tmp_path / "cache", workers=0, sampling=sampling)
    frames, _ = read_video(tmp_path / "clip.webm", sampling, span=(1.0, 2.0))
    expected = torch.cat([encoder(transform(f).unsqueeze(0))[:, 0] for f in frames])
    torch.testing.assert_close(load_ref(cut[0]["features"])[0], expected, rtol=0, atol=1e-5)
    assert cut[0]["features"] != batch[0]["features"]


def test_a_segment_samples_only_the_frames_shown_within_it(tmp_path):
    write_video(tmp_path / "long.mp4", FRAMES, fps=4)  # frame i from i/4 s
    frames, times = read_video(tmp_path / "long.mp4", FrameSampling(frames=3, fps=2), span=(1.0, 2.0))
    assert [frame_index(f) for f in frames] == [FRAMES[4], FRAMES[6], FRAMES[8]]
    assert times == pytest.approx([1.0, 1.5, 2.0])
    with pytest.raises(ArtifactError, match=r"long.mp4: no frame between 5 s and 6 s \(the video's last frame is at 2.75 s\)"):
        read_video(tmp_path / "long.mp4", span=(5.0, 6.0))


def test_encode_applies_a_records_start_and_end(tmp_path):
    from flamingo_cli.inference.encoding import clip_span

    assert clip_span({"video": "v.mp4"}) is None
    assert clip_span({"video": "v.mp4", "start": 1, "end": 2.5}) == (1.0, 2.5)
    assert clip_span({"video": "v.mp4", "start": 3}) == (3.0, float("inf"))
    with pytest.raises(ArtifactError, match=r"q: 'start' and 'end' should be seconds with start < end, got 4 and 2"):
        clip_span({"id": "q", "video": "v.mp4", "start": 4, "end": 2})


def test_feature_shards_keep_a_video_records_segment(tmp_path):
    import tarfile

    import timm
    from safetensors.torch import load

    from flamingo_cli.formats.artifacts import load_ref
    from flamingo_cli.inference.encoding import encode_records, write_feature_shards
    from flamingo_cli.model.config import EncoderConfig
    from flamingo_cli.model.vision_encoder import VisionEncoder

    torch.manual_seed(0)
    encoder = VisionEncoder(EncoderConfig(name="test_vit", image_size=32, random_init=True),
                            timm.create_model("test_vit", img_size=32, num_classes=0))
    write_video(tmp_path / "clip.mp4", FRAMES, fps=4)
    record = {"id": "s", "video": str(tmp_path / "clip.mp4"), "caption": "colours", "start": 1.0, "end": 2.0}
    sampling = FrameSampling(frames=3, fps=2)
    written = []
    assert write_feature_shards(encoder, "test", [record], str(tmp_path / "shard-%06d.tar"), root=tmp_path / "cache",
                                workers=0, sampling=sampling, on_record=written.append) == 1
    (written,) = written
    (direct,) = next(encode_records(encoder, "test", [record], root=tmp_path / "cache", workers=0, sampling=sampling))
    assert written["features"] == direct["features"]  # the segment's clip, not the whole video's
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".features.safetensors"))
        features = load(tar.extractfile(member).read())["0"]
    assert torch.equal(features, load_ref(direct["features"])[0])


def test_a_raw_training_video_is_sampled_within_its_records_segment(tmp_path):
    import json
    import random

    from flamingo_cli.model.config import FlamingoConfig
    from flamingo_cli.model.lm import add_special_tokens
    from flamingo_cli.tiny import tiny_tokenizer
    from flamingo_cli.training.data import make_example
    from flamingo_cli.training.sampling import SamplingConfig

    tokenizer = tiny_tokenizer()
    add_special_tokens(tokenizer, FlamingoConfig().special_tokens)
    write_video(tmp_path / "clip.mp4", FRAMES, fps=4)
    data = (tmp_path / "clip.mp4").read_bytes()
    sample = {"__key__": "k", "mp4": data, "json": json.dumps({"caption": "colours", "start": 2.0, "end": 2.5}).encode()}
    _, media, _ = make_example(sample, tokenizer, SamplingConfig(video_frames=4, video_fps=4), random.Random(0))
    assert [frame_index(f) for f in media[0]] == [FRAMES[8], FRAMES[9], FRAMES[10], FRAMES[10]]  # then held
