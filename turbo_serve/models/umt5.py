"""UMT5 text encoder for Wan: transformers' UMT5EncoderModel plus its sentencepiece tokenizer.

Prompt handling follows Wan (wan/modules/t5.py, wan/modules/tokenizers.py) and diffusers' WanPipeline:
clean the text, tokenize with EOS, truncate to `text_len` (512), run the encoder under the attention
mask, and return `[B, text_len, d_model]` states that are zero past each prompt's true length (the
DiT cross-attends all 512 positions, so the zeros are part of the contract).

Wan pads every prompt to 512 tokens before running the encoder. Padded keys are masked out and the
relative position bias depends only on distances, so the states of the real tokens do not depend on
how much padding follows; we therefore run only up to the longest prompt in the batch and zero-fill to
512, which gives the same output for typical 50-150 token prompts at a fraction of the compute.
"""

from __future__ import annotations

import html
import os
import re

import torch
from torch import nn
from transformers import UMT5Config as HFUMT5Config
from transformers import UMT5EncoderModel

from turbo_serve.models.configs import UMT5Config

try:  # Wan fixes mojibake with ftfy first; it is optional here.
    import ftfy
except ImportError:
    ftfy = None


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (if installed), HTML-unescape twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def hf_umt5_config(config: UMT5Config) -> HFUMT5Config:
    """transformers config of the encoder; the defaults give google/umt5-xxl's."""
    return HFUMT5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_umt5_encoder(config: UMT5Config, *, device: torch.device | str = "meta") -> UMT5EncoderModel:
    """An eval-mode UMT5EncoderModel of this config, by default on the meta device (no memory)."""
    with torch.device(device):
        model = UMT5EncoderModel(hf_umt5_config(config))
    return model.eval().requires_grad_(False)


def load_umt5_tokenizer(folder: str | os.PathLike):
    """The sentencepiece T5 tokenizer in `folder` (tokenizer.json, or spiece.model + tokenizer_config.json).

    AutoTokenizer reads tokenizer_config.json; a bare spiece.model falls back to T5Tokenizer, which
    in transformers 5 converts it to the fast (tokenizers) backend.
    """
    from transformers import AutoTokenizer, T5Tokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"tokenizer folder {folder!r} does not exist")
    if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if os.path.exists(os.path.join(folder, "spiece.model")):
        return T5Tokenizer.from_pretrained(folder, local_files_only=True)
    raise ValueError(f"{folder!r} holds no tokenizer_config.json, tokenizer.json or spiece.model")


class UMT5TextEncoder(nn.Module):
    """Prompts -> Wan text context [B, text_len, d_model], zero past each prompt's length."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int = 512) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [B, L], L = the longest prompt (with EOS), at most text_len."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="longest",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.inference_mode()
    def encode_tokens(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's states [its token count, d_model]: all of the context that is not zero
        padding, so this is what travels between processes (the DiT pads to text_len itself)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return [state[:length] for state, length in zip(states, mask.sum(-1).tolist())]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([pad_text_states(states, self.text_len) for states in self.encode_tokens(prompts)])


def pad_text_states(states: torch.Tensor, text_len: int) -> torch.Tensor:
    """[tokens, dim] text states zero-padded to [text_len, dim], the context shape the DiT takes
    (one shape for every prompt, which captured CUDA graphs depend on)."""
    if states.shape[0] > text_len:
        raise ValueError(f"text states have {states.shape[0]} tokens; the model takes at most {text_len}")
    return torch.nn.functional.pad(states, (0, 0, 0, text_len - states.shape[0]))
