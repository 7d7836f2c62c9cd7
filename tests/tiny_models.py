"""Tiny random-init ``transformers`` models (no download), skipped without the library."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_transformers(name: str) -> nn.Module:
    """A tiny random-init ``transformers`` model (no download)."""
    transformers = pytest.importorskip("transformers")
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    builders = {
        "bert": lambda: transformers.BertModel(
            transformers.BertConfig(hidden_size=16, vocab_size=40, **small)
        ),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                n_layer=2,
                n_embd=16,
                n_head=2,
                vocab_size=40,
                n_positions=16,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "llama": lambda: transformers.LlamaModel(
            transformers.LlamaConfig(hidden_size=16, vocab_size=40, **small)
        ),
        "vit": lambda: transformers.ViTModel(
            transformers.ViTConfig(hidden_size=16, image_size=16, patch_size=4, **small)
        ),
        "convnext": lambda: transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
        ),
        "resnet": lambda: transformers.ResNetModel(
            transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
        ),
    }
    torch.manual_seed(0)
    return builders[name]()
