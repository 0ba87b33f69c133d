"""Policy models: a tiny causal LM from a `transformers` config (random init, no download), or any
local Hugging Face checkpoint directory (the same code then runs a real model on a GPU)."""

from __future__ import annotations

import os

import torch
from torch import nn


def tiny_config(vocab_size: int, arch: str = "llama", hidden: int = 128, layers: int = 3, heads: int = 4,
                max_positions: int = 64, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    """A 0.6M-parameter Llama- or Qwen2-style config for the built-in tasks."""
    from transformers import LlamaConfig, Qwen2Config  # noqa: PLC0415 - transformers is slow to import

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if cls is None:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
               max_position_embeddings=max_positions, tie_word_embeddings=False,
               pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)


def build_policy(vocab_size: int, model_path: str | None = None, arch: str = "llama",
                 dtype: torch.dtype = torch.float32, seed: int = 0, **config_overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if model_path:
        if not os.path.isdir(model_path):
            raise ValueError(f"--model must be a local checkpoint directory, got {model_path!r}")
        return AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size, arch, **config_overrides))
    return model.to(dtype)


class ValueModel(nn.Module):
    """A critic: a causal-LM trunk of the policy's architecture and a scalar head per position."""

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel  # noqa: PLC0415

        self.trunk = AutoModel.from_config(config)
        self.head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return self.head(h).squeeze(-1).float()


def frozen_copy(model: nn.Module) -> nn.Module:
    import copy  # noqa: PLC0415

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
