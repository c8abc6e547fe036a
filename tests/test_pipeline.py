"""InfinityPipeline with a tiny flan-T5-shaped encoder built here (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_infinity, tiny_text_encoder
from huggingface_hub import errors as hub_errors

from fastvar.hub import WeightsUnavailableError
from fastvar.pipeline import InfinityPipeline, schedule_for

pytest.importorskip("transformers")

@pytest.fixture
def pipe():
    model, vae = tiny_infinity(depth=4)
    return InfinityPipeline(model, vae, *tiny_text_encoder())


def arrays(images):
    return [np.asarray(im) for im in images]


def test_prompts_become_images_of_the_requested_size(pipe):
    images = pipe(["a red cat", "the dog on the moon"], seed=1, size=(256, 256), preset=None, progress=False)
    assert [im.size for im in images] == [(256, 256)] * 2 and images[0].mode == "RGB"
    assert not np.array_equal(*arrays(images))
    again = pipe(["a red cat", "the dog on the moon"], seed=1, size=(256, 256), preset="none", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(images), arrays(again)))
    fast = pipe(["a red cat", "the dog on the moon"], seed=1, size=(256, 256), preset="paper", progress=False)
    assert not np.array_equal(arrays(fast)[0], arrays(images)[0])


def test_text_is_packed_as_the_official_script_does(pipe):
    kv, lens, cu, max_len = pipe.encode_prompts(["a cat", "the red dog on the moon"])
    assert lens == [2, 6] and max_len == 6 and cu.tolist() == [0, 2, 8] and cu.dtype == torch.int32
    single = pipe.encode_prompts(["a cat"])[0]
    torch.testing.assert_close(kv[:2], single, atol=1e-5, rtol=0)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = InfinityPipeline.from_pretrained(tmp_path)
    for a, b in ((pipe.transformer, loaded.transformer), (pipe.vae, loaded.vae)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    kwargs = dict(seed=4, size=(256, 256), preset="paper", progress=False)
    assert np.array_equal(arrays(pipe("a cat", **kwargs))[0], arrays(loaded("a cat", **kwargs))[0])


@pytest.mark.parametrize("prompt", [[], "", ["a cat", ""]])
def test_empty_prompts_are_refused(pipe, prompt):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe(prompt, size=(256, 256))


def test_unsupported_sizes_and_models_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unsupported size 1000x1000; supported \(width x height\): .*1024x1024"):
        schedule_for(1000, 1000)
    assert schedule_for(1440, 720)[-1] == (1, 45, 90)
    with pytest.raises(ValueError, match=r"neither an official model \(\['infinity-2b', 'infinity-8b'\]\)"):
        InfinityPipeline.from_pretrained(tmp_path)

    def offline(repo_id, filename, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(WeightsUnavailableError, match="infinity_vae_d32reg.safetensors from the Hugging Face Hub"):
        InfinityPipeline.from_pretrained("infinity-2b")


def test_official_models_are_fetched_by_name_sharded_8b_included(monkeypatch, tmp_path):
    """from_pretrained asks the Hub for the official files (the 8B transformer through its shard index)."""
    asked = []

    def hub(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        raise hub_errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", hub)
    for name, vae_file in (("infinity-2b", "infinity_vae_d32reg"), ("infinity-8b", "infinity_vae_d56_f8_14_patchify")):
        with pytest.raises(WeightsUnavailableError, match=vae_file):
            InfinityPipeline.from_pretrained(name)
    assert asked == [("FoundationVision/Infinity", "infinity_vae_d32reg.safetensors"),
                     ("FoundationVision/Infinity", "infinity_vae_d56_f8_14_patchify.safetensors")]


def test_checkpoint_of_another_family_is_refused(pipe, tmp_path):
    from conftest import tiny_var
    from safetensors.torch import save_file

    pipe.save_pretrained(tmp_path)
    save_file(tiny_var().state_dict(), tmp_path / "transformer.safetensors")  # a VAR where Infinity belongs
    expected = r"checkpoint does not fit Infinity: missing keys: block_chunks.*unexpected keys: attn_bias_for_masking"
    with pytest.raises(ValueError, match=expected):
        InfinityPipeline.from_pretrained(tmp_path)


def test_aspect_ratio_and_pixel_budget_choose_the_schedule(pipe):
    images = pipe("a cat", size=None, aspect_ratio=0.5, pixels="0.06M", preset=None, progress=False)
    assert images[0].size == (22 * 16, 11 * 16)  # the 0.06M scale of the 1:2 template: 11 x 22 tokens
    with pytest.raises(ValueError, match=r"unsupported aspect ratio \(height / width\) 0.9; supported: \[0.333"):
        pipe("a cat", aspect_ratio=0.9)
