"""HARTPipeline: the official release layout, the official prompt format, configs read and refused by name."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import hart_text, tiny_hart, tiny_qwen, write_official_hart

import fastvar
from fastvar import HARTPipeline
from fastvar.hub import WeightsUnavailableError
from fastvar.pipelines.base import to_pil
from fastvar.pipelines.hart import SYSTEM_PROMPT

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    states = write_official_hart(folder / "hart")
    qwen, tokenizer = tiny_qwen()
    qwen.save_pretrained(folder / "qwen")
    tokenizer.save_pretrained(folder / "qwen")
    return folder, states


def assert_state(module, expected):
    own = module.state_dict()
    assert own.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize("how", ["release folder", "llm and tokenizer folders", "weight files"])
def test_the_official_release_layout_loads(release, hub_offline, how):
    folder, states = release
    hart, qwen = folder / "hart", folder / "qwen"
    if how == "release folder":
        pipe = HARTPipeline.from_pretrained(hart, text_encoder=qwen, progress=False)
    elif how == "llm and tokenizer folders":  # as upstream's --model_path points at llm/
        pipe = HARTPipeline.from_pretrained("hart-0.7b", weights=hart / "llm", vae_weights=hart / "tokenizer",
                                            text_encoder=qwen, progress=False)
    else:
        pipe = HARTPipeline.from_pretrained("hart-0.7b", weights=hart / "llm" / "ema_model.bin",
                                            vae_weights=hart / "tokenizer" / "pytorch_model.bin", text_encoder=qwen,
                                            progress=False)
    assert_state(pipe.transformer, states["hart"])
    assert_state(pipe.vae, states["hart_tokenizer"])
    assert pipe.transformer.config == tiny_hart().config  # read from llm/config.json


def test_the_official_prompt_format(release, hub_offline):
    folder, _ = release
    pipe = HARTPipeline.from_pretrained(folder / "hart", text_encoder=folder / "qwen", progress=False)
    T = pipe.transformer.context_token
    text = pipe.encode_prompts(["a red", "the cat on the moon in the snow"])  # 5 tokens, and more than T = 6
    assert text["label_B"].shape == (2, T, pipe.transformer.context_dim)
    assert text["context_mask"].sum(1).tolist() == [5, T]  # each prompt alone, padded or cut to T tokens
    assert text["context_position_ids"][0].tolist() == [0, 1, 2, 3, 4] + [4] * (T - 5)
    tokens = pipe.tokenizer("a red", return_tensors="pt", padding="max_length", max_length=T).input_ids
    system = pipe.tokenizer(SYSTEM_PROMPT, return_tensors="pt").input_ids
    mask = torch.cat((torch.ones_like(system, dtype=torch.bool), tokens != pipe.tokenizer.pad_token_id), 1)
    hidden = pipe.text_encoder(torch.cat((system, tokens), 1), attention_mask=mask).last_hidden_state
    torch.testing.assert_close(text["label_B"][0], hidden[0, system.shape[1]:], atol=1e-6, rtol=0)
    without = HARTPipeline(pipe.transformer, pipe.text_encoder, pipe.tokenizer, system_prompt=None)
    assert not torch.equal(without.encode_prompts(["a red"])["label_B"][0], text["label_B"][0])


def test_images_are_the_official_calls(release, hub_offline):
    folder, _ = release
    pipe = HARTPipeline.from_pretrained(folder / "hart", text_encoder=folder / "qwen", progress=False)
    images = pipe(["a red fox", "the moon"], seed=3, cfg=2.0, preset=None, progress=False)
    text = pipe.encode_prompts(["a red fox", "the moon"])
    expected = pipe.transformer.autoregressive_infer_cfg(B=2, g_seed=3, cfg=2.0, more_smooth=True,
                                                         generator=torch.Generator().manual_seed(3), **text)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, to_pil(expected)))
    again = pipe(["a red fox", "the moon"], seed=3, cfg=2.0, preset=None, progress=False)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # the seed fixes the diffusion noise too
    fast = pipe(["a red fox", "the moon"], seed=3, cfg=2.0, progress=False)
    assert fastvar.summary(pipe.transformer).preset == "paper"
    assert not np.array_equal(np.asarray(fast[0]), np.asarray(images[0]))


@pytest.mark.parametrize("edit, message", [
    (("llm", "attn_type", "gpt2"), r"llm/config.json \(the transformer configuration\): unsupported HART option\(s\) "
                                   r"\{'attn_type': 'gpt2'\}"),
    (("llm", "fancy_option", 1), r"llm/config.json .*unknown HART argument\(s\) \['fancy_option'\]"),
    (("tokenizer", "quantizer_type", "var"), r"tokenizer/config.json \(the tokenizer configuration\): unsupported "
                                             r"HART tokenizer options quantizer_type='var'"),
])
def test_config_values_fastvar_does_not_implement_are_refused_by_name(release, tmp_path, hub_offline, edit, message):
    folder, _ = release
    shutil.copytree(folder / "hart", tmp_path / "hart")
    sub, key, value = edit
    config = tmp_path / "hart" / sub / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), key: value}))
    with pytest.raises(ValueError, match=message):
        HARTPipeline.from_pretrained(tmp_path / "hart", text_encoder=folder / "qwen", progress=False)


def test_offline_names_the_missing_file_and_its_parameter(tmp_path, hub_offline, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=r"^tokenizer/config.json .* is not in the Hugging Face cache, "
                                                      r".*huggingface.co/mit-han-lab/hart-0.7b-1024px and pass "
                                                      r"vae_weights=PATH \(CLI: --vae-weights PATH\)$"):
        HARTPipeline.from_pretrained("hart-0.7b")


def test_a_wrong_local_path_is_named_as_given(tmp_path, hub_offline):
    hart = tmp_path / "hart"
    write_official_hart(hart)
    typo = tmp_path / "hrat" / "tokenizer"
    with pytest.raises(WeightsUnavailableError, match=rf"^vae_weights={typo}: no such file or folder$"):
        HARTPipeline.from_pretrained("hart-0.7b", weights=hart / "llm", vae_weights=typo)
    (hart / "tokenizer" / "config.json").rename(hart / "config.json")
    with pytest.raises(WeightsUnavailableError, match=rf"^{hart}/tokenizer \(vae_weights\) holds none of "
                                                      r"\['tokenizer/config.json', 'config.json'\]$"):
        HARTPipeline.from_pretrained("hart-0.7b", weights=hart / "llm", vae_weights=hart / "tokenizer" /
                                     "pytorch_model.bin")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=["a cat", 3]), r"prompt must be a non-empty string or a non-empty list of them"),
    (dict(prompt="a cat", cfg=-1.0), r"cfg = -1\.0: the guidance scale must be a number >= 0"),
    (dict(prompt="a cat", top_p=1.2), r"top_p = 1\.2: must be a number in \[0, 1\]"),
])
def test_inputs_are_checked_before_any_compute(kwargs, message):
    pipe = HARTPipeline(tiny_hart())
    calls = []
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, progress=False)
    assert calls == []


def test_the_model_call_refuses_what_is_not_implemented():
    model = tiny_hart()
    with pytest.raises(ValueError, match=r"num_maskgit_iters=4 is not supported: only the one-pass last scale"):
        model.autoregressive_infer_cfg(**hart_text([3]), num_maskgit_iters=4)


def test_random_pipeline_without_a_text_encoder(tiny_official):
    pipe = HARTPipeline.random()
    images = pipe(["a red fox", "the moon"], progress=False)
    assert len(images) == 2 and images[0].size == images[1].size
    mask = pipe.encode_prompts(["a red fox"])["context_mask"]
    assert mask.sum().item() == 4  # its three words and an end token


def test_bf16_runs_and_draws_the_fp32_tokens_where_the_logits_are_clear(monkeypatch):
    import fastvar.models.hart as hart_module

    model, runs = tiny_hart(), {}
    for dtype in (torch.float32, torch.bfloat16):
        seen = []
        monkeypatch.setattr(hart_module, "sample_with_top_k_top_p_",
                            lambda lg, seen=seen, sample=hart_module.sample_with_top_k_top_p_, **kw:
                            seen.append(lg.float().clone()) or sample(lg, **kw))
        HARTPipeline(model, dtype=dtype)("a red fox", preset=None, progress=False)
        monkeypatch.undo()
        runs[dtype] = seen
    compared = 0
    for fp32, bf16 in zip(runs[torch.float32][:3], runs[torch.bfloat16][:3]):
        top2 = fp32.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 0.5
        assert torch.equal(fp32.argmax(-1)[clear], bf16.argmax(-1)[clear])
        compared += int(clear.sum())
    assert compared >= 3 and not torch.equal(runs[torch.float32][-1], runs[torch.bfloat16][-1])
