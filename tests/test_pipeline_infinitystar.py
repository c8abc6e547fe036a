"""InfinityStarPipeline: the official call and settings, videos and images out, the release layout, inputs
checked before any compute; and fastvar.video, which writes the clips."""

from __future__ import annotations

import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import (
    TINY_INFINITYSTAR,
    tiny_infinitystar_build,
    tiny_text_encoder,
    write_hub_cache,
    write_official_infinitystar,
)
from PIL import Image

from fastvar import video
from fastvar.hub import WeightsUnavailableError
from fastvar.pipelines import InfinityStarPipeline
from fastvar.pipelines.infinitystar import PROMPT_SUFFIX, official_prompt, plan, supported_sizes, to_clips

pytest.importorskip("transformers")

FRAMES = 17  # a 1-second video: 16 frames a second and the first


def arrays(clip):
    return [np.asarray(frame) for frame in clip]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    return folder, write_official_infinitystar(folder)


@pytest.fixture
def pipe(tiny_infinitystar):
    """The tiny model with the tiny T5, sampled as the (tiny) 720p checkpoint."""
    torch.manual_seed(0)
    model, vae = tiny_infinitystar_build()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return InfinityStarPipeline(model, vae, *tiny_text_encoder())


def spy(pipe, monkeypatch):
    """Every call of the transformer's sampling, with its arguments, run as it is."""
    calls, call = [], pipe.transformer.autoregressive_infer
    monkeypatch.setattr(pipe.transformer, "autoregressive_infer",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or call(*args, **kwargs))
    return calls


# ----------------------------------------------------------------------------- generation


def test_a_video_and_an_image_from_random_weights(tiny_infinitystar):
    pipe = InfinityStarPipeline.random()
    assert pipe.text_encoder is None
    clips = pipe(["a red fox", "a blue bird"], duration=1, preset=None, progress=False)
    assert [len(c) for c in clips] == [FRAMES, FRAMES] and clips[0][0].size == (336, 192)  # 16:9 at 0.06M
    first = arrays(clips[0])
    assert np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])  # upstream's frame 0
    assert not np.array_equal(first[5], arrays(clips[1])[5])
    images = pipe("a red fox", duration=0, size="256x256", preset=None, progress=False)
    assert len(images) == 1 and len(images[0]) == 1 and images[0][0].size == (256, 256)


def test_the_call_is_the_official_one_with_the_official_settings(pipe, monkeypatch):
    calls = spy(pipe, monkeypatch)
    clips = pipe("a red fox", duration=1, seed=4, preset=None, progress=False)
    (model_args, kwargs), = calls
    schedule = model_args[1]
    assert schedule == plan(["infinitystar-8b-720p"], 1, None, None) and len(schedule) == 22
    assert model_args[3] == TINY_INFINITYSTAR["infinitystar-8b-720p"].checkpoint and kwargs["B"] == 1
    assert kwargs["cfg_list"] == [34.0] * 22 and kwargs["apg_norm_threshold"] == 0.05
    assert kwargs["tau_list"] == [1.0] * 11 + [0.4] * 11  # the image clip's scales, then the video clip's
    assert kwargs["g_seed"] == [4] and kwargs["negative_label_B_or_BLT"] is None
    expected = to_clips(pipe.vae.decode(pipe.transformer.autoregressive_infer(*model_args, **kwargs)))
    assert all(np.array_equal(a, b) for clip, same in zip(clips, expected) for a, b in zip(arrays(clip), arrays(same)))
    pipe("a cat", duration=0, seed=3, cfg=3.0, tau_image=0.5, negative_prompt="blurry", preset=None, progress=False)
    kwargs = calls[-1][1]
    assert kwargs["tau_list"] == [0.5] * 11 and kwargs["cfg_list"] == [3.0] * 11 and kwargs["g_seed"] == [3]
    assert kwargs["negative_label_B_or_BLT"][1] == [1]  # 'blurry' as given: one (unknown) word


def test_each_row_of_a_batch_is_its_prompt_alone(pipe):
    kwargs = dict(duration=1, preset=None, progress=False)
    batch = pipe(["a cat", "the red dog on the moon"], seed=[1, 3], **kwargs)
    alone = pipe("the red dog on the moon", seed=3, **kwargs)[0]
    assert all(np.array_equal(a, b) for a, b in zip(arrays(batch[1]), arrays(alone)))
    twice = pipe(["a cat", "a cat"], seed=1, duration=0, preset=None, progress=False)  # an int seeds every row
    assert np.array_equal(arrays(twice[0])[0], arrays(twice[1])[0])


def test_prompts_get_the_official_suffix_and_a_video_its_duration_tag(pipe, monkeypatch):
    assert official_prompt("a cat", 5) == "<<<t=5s>>>a cat, Close-up on big objects, emphasize scale and detail"
    assert official_prompt("a cat", 0) == f"a cat{PROMPT_SUFFIX}" and official_prompt("a cat", 10, "") == \
        "<<<t=10s>>>a cat"
    encoded, encode = [], pipe.encode_prompts
    monkeypatch.setattr(pipe, "encode_prompts", lambda texts: encoded.append(list(texts)) or encode(texts))
    pipe("a cat", duration=1, negative_prompt="blurry", preset=None, progress=False)
    pipe(["a cat", "a dog"], duration=0, prompt_suffix="", preset=None, progress=False)
    assert encoded == [[f"<<<t=1s>>>a cat{PROMPT_SUFFIX}"], ["blurry"], ["a cat", "a dog"]]


def test_text_is_encoded_as_the_official_script_does(pipe):
    kv, lens, cu, max_len = pipe.encode_prompts(["a cat", "the red dog on the moon"])
    assert lens == [2, 6] and max_len == 6 and cu.tolist() == [0, 2, 8] and cu.dtype == torch.int32
    tokens = pipe.tokenizer(["a cat"], max_length=512, padding="max_length", return_tensors="pt")
    hidden = pipe.text_encoder(**tokens).last_hidden_state[0, :2]
    assert tokens.input_ids.shape == (1, 512) and torch.equal(kv[:2], hidden)  # padded to 512, as alone


def test_frames_become_pixels_as_upstream_does():
    def gray(*values):  # (1, 3, 1, 1, n): one row of gray pixels
        return torch.tensor(values).view(1, 1, 1, 1, -1).expand(1, 3, 1, 1, -1)

    def pixels(frame):
        return np.asarray(frame)[0, :, 0].tolist()

    x = gray(-1.5, -1.0, 0.0, 0.999, 1.0, 2.0)
    clip = to_clips(torch.cat([x + 0.5, x, x - 0.5], dim=2))[0]  # three frames
    assert pixels(clip[1]) == [0, 0, 127, 254, 255, 255]  # (x + 1) / 2, clamped, times 255, truncated
    assert pixels(clip[0]) == pixels(clip[1])  # a video's frame 0 is its frame 1
    assert pixels(clip[2]) == [0, 0, 63, 191, 191, 255]
    image = to_clips(x)[0]
    assert len(image) == 1 and pixels(image[0]) == [0, 0, 127, 254, 255, 255]
    assert pixels(to_clips(gray(0.5742))[0][0]) == [200]  # float32: 200.7
    assert pixels(to_clips(gray(0.5742).bfloat16())[0][0]) == [201]  # in bfloat16, as the bf16 decoder returns


# ----------------------------------------------------------------------------- what a call accepts


def test_official_durations_sizes_and_schedules():
    video720 = plan(["infinitystar-8b-720p"], 5, None, None)  # the official scripts' call: 16:9, 81 frames
    assert video720[-1] == (20, 45, 80) and len(video720) == 30 and 1 + 4 * (1 + 20 - 1) == 81
    assert plan(["infinitystar-8b-480p"], 10, None, None)[-1] == (20, 30, 53)  # two 20-frame clips
    image480 = plan(["infinitystar-8b-480p"], 0, None, None)
    assert len(image480) == 14 and image480[-1] == (1, 30, 53)  # 848x480
    assert (848, 480) in supported_sizes("infinitystar-8b-480p") and (1280, 720) in supported_sizes(
        "infinitystar-8b-720p")
    assert plan(["infinitystar-8b-720p"], 0, "720x1280", None)[-1] == (1, 80, 45)
    assert InfinityStarPipeline.check_call("a cat", duration=10, size="848x480")[2][-1] == (20, 30, 53)  # some model


@pytest.mark.parametrize("kwargs, message", [
    (dict(duration=10), r"^duration = 10: infinitystar-8b-720p makes 0 or 5 seconds \(0: an image\)$"),
    (dict(duration=-1), r"duration = -1: must be a whole number of seconds >= 0"),
    (dict(duration=2.5), r"duration = 2\.5: must be a whole number of seconds"),
    (dict(size="848x480"), r"unsupported size 848x480 \(width x height\) for infinitystar-8b-720p; nearest supported: "
                           r"1280x720, "),
    (dict(size="a lot"), r"size must be \(width, height\) or 'WIDTHxHEIGHT'"),
    (dict(aspect_ratio=0.9), r"unsupported aspect ratio \(height / width\) 0\.9; supported: \[0\.336"),
    (dict(aspect_ratio=float("nan")), r"aspect_ratio must be a positive number"),
    (dict(size="1280x720", aspect_ratio=0.5), r"give size or aspect_ratio, not both"),
    (dict(seed=[1, 2]), r"seed must be an int \(every row\) or a list of one int per prompt \(1\)"),
    (dict(seed=2**70), r"seed = 1180591620717411303424: must be an int"),
    (dict(negative_prompt=["x", "y"]), r"negative_prompt has 2 entries for 1 prompts"),
    (dict(cfg=-1.0), r"cfg = -1\.0: the guidance scale must be a number >= 0"),
    (dict(tau_video=0), r"tau = 0: the temperature must be a number > 0"),
    (dict(apg_norm_threshold=-0.1), r"apg_norm_threshold = -0\.1: must be a number >= 0"),
    (dict(prompt_suffix=None), r"prompt_suffix must be a string \(''"),
    (dict(preset="fastest"), r"unknown infinitystar preset 'fastest'"),
])
def test_mistakes_are_refused_by_name_before_any_compute(kwargs, message):
    """The official 720p model's sizes and durations (a tiny model stands in; nothing runs)."""
    pipe = InfinityStarPipeline(*tiny_infinitystar_build())
    calls = []
    pipe.transformer.unregistered_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **kwargs, progress=False)
    assert calls == []


def test_without_a_model_a_call_is_checked_against_every_official_model():
    with pytest.raises(ValueError, match=r"^duration = 7: infinitystar-8b-720p makes 0 or 5 seconds \(0: an image\); "
                                         r"infinitystar-8b-480p makes 0, 5 or 10 seconds \(0: an image\)$"):
        InfinityStarPipeline.check_call("a cat", duration=7)
    with pytest.raises(ValueError, match=r"unsupported size 1000x1000 \(width x height\) for infinitystar-8b-720p or "
                                         r"infinitystar-8b-480p; nearest supported: "):
        InfinityStarPipeline.check_call("a cat", size="1000x1000")
    with pytest.raises(ValueError, match=r"unsupported size 1280x720 \(width x height\) for infinitystar-8b-480p;"):
        InfinityStarPipeline.check_call("a cat", duration=10, size="1280x720")  # only 480p makes 10 seconds
    with pytest.raises(ValueError, match=r"unknown InfinityStar 'infinitystar-2b'; the official ones: \["):
        InfinityStarPipeline(*tiny_infinitystar_build(), name="infinitystar-2b")


# ----------------------------------------------------------------------------- loading


def assert_state(module, expected):
    own = module.state_dict()
    assert set(expected) - set(own) <= {"encoder.conv_in.conv.weight"}
    for key, value in own.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


def test_the_release_loads_as_downloaded(release, tiny_infinitystar, hub_offline):
    folder, states = release
    pipe = InfinityStarPipeline.from_pretrained(folder, progress=False)  # its text encoder beside the weights
    assert_state(pipe.transformer, states["transformer"])
    assert_state(pipe.vae, states["vae"])
    assert pipe.name == "infinitystar-8b-720p" and pipe.text_encoder is not None
    same = InfinityStarPipeline.from_pretrained(
        "infinitystar-8b-720p", weights=folder / "infinitystar_8b_720p_weights",
        vae_weights=folder / "infinitystar_videovae.pth", text_encoder=folder / "text_encoder" / "flan-t5-xl-official",
        dtype="bf16", progress=False)
    assert {p.dtype for b in same.transformer.unregistered_blocks for p in b.parameters()} == {torch.bfloat16}
    assert same.transformer.head.weight.dtype == same.vae.proj_up.weight.dtype == torch.float32
    assert same.text_encoder.dtype == torch.float16  # the official precisions
    assert_state(same.vae, states["vae"])
    clip = same("a cat", duration=0, preset=None, progress=False)[0]
    assert len(clip) == 1 and clip[0].size == (336, 192)


def test_the_release_loads_from_the_hub_cache(release, tiny_infinitystar, hub_offline, tmp_path, monkeypatch):
    folder, states = release
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and "text_encoder" not in p.parts}
    write_hub_cache(tmp_path, "FoundationVision/InfinityStar", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    pipe = InfinityStarPipeline.from_pretrained(text_encoder=folder / "text_encoder" / "flan-t5-xl-official",
                                                progress=False)
    assert_state(pipe.transformer, states["transformer"])
    with pytest.raises(WeightsUnavailableError, match=r"infinitystar_8b_480p_weights/ .*is not in the Hugging Face "
                                                      r"cache, .*pass weights=PATH \(CLI: --weights PATH\)$"):
        InfinityStarPipeline.from_pretrained("infinitystar-8b-480p")
    with pytest.raises(WeightsUnavailableError, match=r"^google/flan-t5-xl is not in the Hugging Face cache"):
        InfinityStarPipeline.from_pretrained("infinitystar-8b-720p")  # no text encoder beside the cached weights


def test_a_folder_without_one_official_transformer_is_refused(release, tiny_infinitystar, tmp_path):
    folder, _ = release
    with pytest.raises(ValueError, match=r"holds no official InfinityStar transformer .*; name the model instead"):
        InfinityStarPipeline.from_pretrained(tmp_path)
    (tmp_path / "infinitystar_8b_480p_weights").mkdir()
    for name in ("infinitystar_8b_480p_weights", "infinitystar_8b_720p_weights"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds both official transformers; name the model instead, e\.g\. "
                                         r"InfinityStarPipeline\.from_pretrained\('infinitystar-8b-480p', weights="):
        InfinityStarPipeline.from_pretrained(tmp_path)


def test_model_offload_moves_each_module_only_while_it_works(pipe, monkeypatch):
    expected = pipe("a cat", duration=0, preset=None, progress=False)[0][0]
    pipe.enable_model_cpu_offload("cpu")
    names = {id(m): name for name, m in pipe.modules().items()}
    moves, to = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moves.append(names.get(id(self))) or to(
        self, *a, **k))
    image = pipe("a cat", duration=0, preset=None, progress=False)[0][0]
    assert [m for m in moves if m] == ["text_encoder", "text_encoder", "transformer", "transformer", "vae", "vae"]
    assert np.array_equal(np.asarray(image), np.asarray(expected))


# ----------------------------------------------------------------------------- writing videos


def gradient_clip(frames: int = 9, size: tuple[int, int] = (64, 48)) -> list[Image.Image]:
    """Smooth frames (what H.264 keeps well), each brighter than the last."""
    w, h = size
    ramp = np.add.outer(np.arange(h), np.arange(w)).astype(np.float32) / (h + w)
    return [Image.fromarray((np.stack([ramp, ramp[::-1], ramp], -1) * 200 + 5 * i).astype(np.uint8))
            for i in range(frames)]


def test_videos_are_written_as_mp4_animated_images_or_frames(tmp_path):
    av = pytest.importorskip("av")
    clip = gradient_clip()
    assert video.save_video(clip, tmp_path / "c.mp4") == [tmp_path / "c.mp4"]
    with av.open(str(tmp_path / "c.mp4")) as container:
        stream = container.streams.video[0]
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == video.FPS and stream.codec_context.name == "h264"
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)
    assert max(np.abs(d.astype(int) - np.asarray(f, dtype=int)).mean() for d, f in zip(decoded, clip)) < 3
    for suffix in (".gif", ".webp"):
        with Image.open(video.save_video(clip, tmp_path / f"c{suffix}")[0]) as animated:
            assert animated.n_frames == 9 and animated.size == (64, 48)
    frames = video.save_video(clip, tmp_path / "c.png")
    assert [f.name for f in frames] == [f"c-{i:03d}.png" for i in range(9)]
    assert all(np.array_equal(np.asarray(Image.open(f)), np.asarray(c)) for f, c in zip(frames, clip))
    with pytest.raises(ValueError, match=r"c\.avi: a video is written as \.mp4, \.gif, \.webp, \.png"):
        video.save_video(clip, tmp_path / "c.avi")


def test_without_pyav_mp4_names_the_extra_and_the_fallbacks(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    monkeypatch.setitem(sys.modules, "av", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"^writing \.mp4 needs PyAV: pip install .*; without it, write an animated "
                                          r"\.gif or \.webp, or \.png \(one file per frame\)") as info:
        video.save_video(gradient_clip(), tmp_path / "c.mp4")
    assert "pip install " + " ".join(f"'{p}'" for p in extras["video"]) in str(info.value)
    assert not (tmp_path / "c.mp4").exists()
    assert video.save_video(gradient_clip(), tmp_path / "c.gif") == [tmp_path / "c.gif"]
