"""Model loading: the offline CLIP tokenizer, tiny pipelines through load_pipeline, suites, errors."""

from __future__ import annotations

import time

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from editeval.models import ModelNotAvailableError, load_pipeline, resolve_checkpoint, resolve_dtype
from editeval.models.tokenizer import clip_tokenizer

# Token ids of openai/clip-vit-large-patch14's tokenizer (BOS 49406 ... EOS 49407).
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
}
PROMPTS = [
    "A wooden bench in front of a lush green hill with trees",
    "Change the snowland to a beach.",
    "a cat wearing sunglasses, 4k, photorealistic!!",
    "Make it look like a Van Gogh painting",
]


def test_tokenizer_matches_known_clip_ids(tmp_path):
    tokenizer = clip_tokenizer(tmp_path)
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    for prompt, ids in KNOWN_IDS.items():
        assert tokenizer(prompt).input_ids == ids


def test_tokenizer_matches_open_clip_reference(tmp_path):
    """Word pieces of free-form prompts equal open_clip's own BPE implementation of the same vocab."""
    tokenizer = clip_tokenizer(tmp_path)
    reference = SimpleTokenizer()
    for prompt in PROMPTS:
        assert tokenizer(prompt).input_ids[1:-1] == reference.encode(prompt)
    padded = tokenizer(PROMPTS[0], padding="max_length").input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_tiny_pipelines_load_like_a_user_checkpoint(tiny_sd, tiny_ip2p):
    assert type(tiny_sd).__name__ == "StableDiffusionPipeline"
    assert type(tiny_ip2p).__name__ == "StableDiffusionInstructPix2PixPipeline"
    assert tiny_sd.unet.config.in_channels == 4 and tiny_ip2p.unet.config.in_channels == 8
    assert tiny_sd.vae_scale_factor == 8
    assert tiny_sd.unet.dtype == torch.float32  # fp32 on the CPU by default
    assert type(tiny_sd.scheduler).__name__ == "PNDMScheduler"
    assert type(tiny_ip2p.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    attention = [n for n in tiny_sd.unet.attn_processors if "attn2" in n]
    assert {n.split(".")[0] for n in attention} >= {"down_blocks", "up_blocks"}
    assert len({n.split(".")[1] for n in attention if n.startswith("down_blocks")}) == 2


def test_local_directory_loads_by_path(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "copy")
    pipe = load_pipeline(str(tmp_path / "copy"))
    assert torch.equal(pipe.unet.conv_out.weight, tiny_sd.unet.conv_out.weight)


def test_suites_map_kinds_to_checkpoints():
    assert resolve_checkpoint("sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_checkpoint("sd15", "instruction") == "timbrooks/instruct-pix2pix"
    assert resolve_checkpoint("ip2p") == "timbrooks/instruct-pix2pix"
    assert resolve_checkpoint("someone/model") == "someone/model"
    with pytest.raises(ValueError, match="no instruction checkpoint"):
        resolve_checkpoint("sd21", "instruction")
    with pytest.raises(ValueError, match="unknown model kind"):
        resolve_checkpoint("sd15", "video")


def test_dtype_defaults_and_overrides():
    assert resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")


def test_missing_model_gives_short_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline("sd15")
    message = str(info.value)
    assert time.perf_counter() - start < 10  # no network retries
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "hf download" in message and "local" in message
    assert "Traceback" not in message and len(message) < 500
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no such directory"):
        load_pipeline(str(tmp_path / "nope"))
