"""UMT5 text encoder: tiny tokenizer, Wan's prompt contract (512 rows, zeros past the length), checkpoints."""

import math

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import UMT5ForConditionalGeneration

from turbo_serve.models.configs import UMT5Config, get_preset
from turbo_serve.models.checkpoint import CheckpointKeyError
from turbo_serve.models.loading_vae_text import load_text_encoder
from turbo_serve.models.tokenizer import ensure_tiny_tokenizer, train_tiny_spiece
from turbo_serve.models.umt5 import clean_prompt, hf_umt5_config, load_umt5_tokenizer

TINY = get_preset("tiny-t2v").text_encoder
PROMPTS = [
    "A red fox runs across a snowy pine forest, cinematic lighting.",
    "Two laughing children chase kites.",
    "A   glowing jellyfish &amp;amp; a sea turtle drift lazily along a vibrant coral reef at dawn, slow motion.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return ensure_tiny_tokenizer(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    return load_text_encoder(None, TINY, tokenizer=tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def hf_folder(encoder, tokenizer_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("umt5") / "hf"
    encoder.model.save_pretrained(folder)
    load_umt5_tokenizer(tokenizer_dir).save_pretrained(folder)
    return folder


def test_tiny_tokenizer_is_deterministic_and_matches_sentencepiece(tokenizer_dir):
    model = (tokenizer_dir / "spiece.model").read_bytes()
    assert model == train_tiny_spiece()
    processor = spm.SentencePieceProcessor(model_proto=model)
    assert processor.get_piece_size() == TINY.vocab_size
    assert [processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    tokenizer = load_umt5_tokenizer(tokenizer_dir)
    assert len(tokenizer) == TINY.vocab_size
    for text in PROMPTS[:2] + ["Zebras, 42 of them!"]:  # the last has characters outside the corpus
        assert tokenizer(text).input_ids == processor.encode(text) + [1]
    for text in PROMPTS[:2]:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert 2 in tokenizer("Zebras, 42 of them!").input_ids


def test_tokenizer_cache_is_reused(tmp_path):
    first = ensure_tiny_tokenizer(tmp_path)
    stamp = (first / "spiece.model").stat().st_mtime_ns
    assert ensure_tiny_tokenizer(tmp_path) == first
    assert (first / "spiece.model").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_clean_prompt_unescapes_twice_and_collapses_whitespace():
    assert clean_prompt("  a &amp;amp; b\n\t c  ") == "a & b c"


def test_encode_pads_to_512_and_zeros_rows_past_each_length(encoder):
    context = encoder.encode(PROMPTS)
    assert context.shape == (3, 512, TINY.d_model)
    _, mask = encoder.tokenize(PROMPTS)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == 3
    for row, length in zip(context, lengths):
        assert row[:length].abs().sum(-1).min() > 0
        assert torch.equal(row[length:], torch.zeros_like(row[length:]))


def test_encode_equals_running_all_512_positions_like_wan(encoder):
    """Running only up to the longest prompt must give what Wan's full 512-token pass gives."""
    batch = encoder.tokenizer(
        [clean_prompt(p) for p in PROMPTS], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        full = encoder.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    full = full * batch.attention_mask[..., None]
    torch.testing.assert_close(encoder.encode(PROMPTS), full, rtol=1e-5, atol=1e-5)


def test_batch_gives_the_same_rows_as_one_prompt_at_a_time(encoder):
    batched = encoder.encode(PROMPTS)
    for index, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batched[index], encoder.encode([prompt])[0], rtol=1e-5, atol=1e-5)


def test_long_prompts_truncate_to_512_ending_in_eos(encoder):
    prompt = " ".join([PROMPTS[0]] * 80)
    ids, mask = encoder.tokenize([prompt])
    assert ids.shape == (1, 512) and ids[0, -1] == 1 and mask.all()
    assert encoder.encode([prompt])[0].abs().sum(-1).min() > 0


def test_encode_rejects_a_bare_string(encoder):
    with pytest.raises(ValueError, match="list of strings"):
        encoder.encode(PROMPTS[0])


def test_hf_folder_round_trip_holds_model_and_tokenizer(hf_folder, encoder):
    loaded = load_text_encoder(hf_folder, TINY)
    torch.testing.assert_close(loaded.encode(PROMPTS), encoder.encode(PROMPTS), rtol=0, atol=0)


def test_full_seq2seq_folder_loads_its_encoder(tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    seq2seq = UMT5ForConditionalGeneration(hf_umt5_config(TINY)).eval()
    seq2seq.save_pretrained(tmp_path)
    loaded = load_text_encoder(tmp_path, TINY, tokenizer=tokenizer_dir)
    ids, mask = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        expected = seq2seq.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(loaded.encode(PROMPTS)[:, : ids.shape[1]], expected * mask[..., None])


_WAN_LEAVES = {
    "layer.0.layer_norm": "norm1",
    "layer.0.SelfAttention.q": "attn.q",
    "layer.0.SelfAttention.k": "attn.k",
    "layer.0.SelfAttention.v": "attn.v",
    "layer.0.SelfAttention.o": "attn.o",
    "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
    "layer.1.layer_norm": "norm2",
    "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
    "layer.1.DenseReluDense.wi_1": "ffn.fc1",
    "layer.1.DenseReluDense.wo": "ffn.fc2",
}


def _wan_t5_state(hf_state: dict) -> dict:
    """HF -> the names of Wan's T5Encoder (wan/modules/t5.py), as in models_t5_umt5-xxl-enc-bf16.pth."""
    state = {
        "token_embedding.weight": hf_state["shared.weight"],
        "norm.weight": hf_state["encoder.final_layer_norm.weight"],
    }
    for key, value in hf_state.items():
        if key.startswith("encoder.block."):
            index, _, rest = key[len("encoder.block.") :].partition(".")
            module, _, leaf = rest.rpartition(".")
            state[f"blocks.{index}.{_WAN_LEAVES[module]}.{leaf}"] = value
    return state


def _wan_t5_reference(state: dict, ids: torch.Tensor, mask: torch.Tensor, config: UMT5Config) -> torch.Tensor:
    """Wan's T5Encoder forward written out from its definition: T5 RMS norm, unscaled attention with a
    per-layer bidirectional relative bias (32 buckets, max distance 128), fc1(x) * gelu_tanh(gate(x))."""

    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    length = ids.shape[1]
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = config.relative_attention_num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    large = exact + (
        torch.log(distance.float() / exact) / math.log(config.relative_attention_max_distance / exact) * (half - exact)
    ).long()
    buckets = (relative > 0).long() * half + torch.where(distance < exact, distance, large.clamp(max=half - 1))
    masked = torch.zeros(mask.shape).masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]
    x = state["token_embedding.weight"][ids]
    batch, heads, dim = ids.shape[0], config.num_heads, config.d_kv
    for i in range(config.num_layers):
        p = f"blocks.{i}."
        h = norm(x, state[p + "norm1.weight"])
        q, k, v = (F.linear(h, state[p + f"attn.{n}.weight"]).view(batch, length, heads, dim) for n in "qkv")
        bias = state[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        scores = torch.einsum("binc,bjnc->bnij", q, k) + bias + masked
        attended = torch.einsum("bnij,bjnc->binc", scores.softmax(-1), v).reshape(batch, length, heads * dim)
        x = x + F.linear(attended, state[p + "attn.o.weight"])
        h = norm(x, state[p + "norm2.weight"])
        gate = F.gelu(F.linear(h, state[p + "ffn.gate.0.weight"]), approximate="tanh")
        gated = F.linear(h, state[p + "ffn.fc1.weight"]) * gate
        x = x + F.linear(gated, state[p + "ffn.fc2.weight"])
    return norm(x, state["norm.weight"])


def test_wan_pth_loads_and_computes_wan_t5(encoder, tokenizer_dir, tmp_path):
    wan_state = _wan_t5_state(encoder.model.state_dict())
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(wan_state, path)
    loaded = load_text_encoder(path, TINY, tokenizer=tokenizer_dir)
    context = loaded.encode(PROMPTS)
    torch.testing.assert_close(context, encoder.encode(PROMPTS), rtol=0, atol=0)
    ids, mask = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        expected = _wan_t5_reference(wan_state, ids, mask, TINY) * mask[..., None]
    torch.testing.assert_close(context[:, : ids.shape[1]], expected, rtol=1e-4, atol=1e-4)


def test_key_errors_name_the_keys(encoder, tokenizer_dir):
    state = dict(encoder.model.state_dict())
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["encoder.block.2.layer.0.layer_norm.weight"] = torch.ones(TINY.d_model)
    with pytest.raises(CheckpointKeyError) as error:
        load_text_encoder(state, TINY, tokenizer=tokenizer_dir)
    message = str(error.value)
    assert "1 missing keys: encoder.block.1.layer.1.DenseReluDense.wo.weight" in message
    assert "1 unexpected keys: encoder.block.2.layer.0.layer_norm.weight" in message


def test_folder_config_mismatch_and_missing_tokenizer(hf_folder, tokenizer_dir):
    wider = UMT5Config(**{**TINY.__dict__, "d_model": 128})
    with pytest.raises(ValueError, match="d_model=64 \\(preset 128\\)"):
        load_text_encoder(hf_folder, wider)
    with pytest.raises(ValueError, match="tokenizer folder is required"):
        load_text_encoder(None, TINY)


def test_bf16_random_weights_encode(tokenizer_dir):
    encoder = load_text_encoder(None, TINY, tokenizer=tokenizer_dir, dtype=torch.bfloat16)
    context = encoder.encode(PROMPTS[:1])
    assert context.dtype == torch.bfloat16 and torch.isfinite(context).all()
