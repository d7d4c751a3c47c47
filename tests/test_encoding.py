"""Sentence encodings: masked mean pooling against hand computations, the fast path against
independent forwards and the naive loop, pruned models, the random control and the file format."""

from __future__ import annotations

import copy
import string

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaModel, XLMRobertaTokenizer

from tests.reference import encode_naive
from xlsub.artifacts import load_encodings, save_encodings
from xlsub.errors import XlsubError
from xlsub.models.encoding import encode, mean_pool, random_like
from xlsub.models.heads import HeadGates, num_heads
from xlsub.models.pruning import load_pruned, prune_heads, save_pruned

LAYERS, HEADS, HIDDEN, POSITIONS = 2, 4, 16, 40
MAX_TOKENS = POSITIONS - 2  # XLM-R positions start after pad_token_id = 1
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "and"]
SENTENCES = [
    "the cat sat on the mat.",
    "a dog.",
    "the dog ran far far away and the cat sat.",
    "xyz",
    "on the mat the cat sat and the dog ran away.",
    "cat",
    "away and away and away.",
    "the mat.",
    "dog and cat and mat.",
]
LONG = " ".join(["the cat sat on the mat and the dog ran far away"] * 3)  # > 30 tokens, still < MAX_TOKENS


@pytest.fixture(scope="module")
def tokenizer() -> XLMRobertaTokenizer:
    pieces = ["▁" + c for c in string.ascii_lowercase] + list(string.ascii_lowercase) + ["▁" + w for w in WORDS] + ["."]
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=specials + [(p, -1.0 - 0.1 * len(p)) for p in pieces])


def tiny_model(tokenizer, seed: int = 0, **overrides) -> XLMRobertaForMaskedLM:
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=32, max_position_embeddings=POSITIONS, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2, **overrides,
    )
    return XLMRobertaForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- pooling --------------------------------------------------------------------------------------

def test_mean_pool_by_hand():
    torch.manual_seed(0)
    hidden = torch.randn(3, 2, 4, 5)  # [layers+1, B, T, d]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    hidden[:, 1, 2:] = float("nan")  # padding holds anything; it must not reach the mean
    expected = torch.zeros(3, 2, 5)
    for layer in range(3):
        for b, length in enumerate([4, 2]):
            for j in range(5):
                expected[layer, b, j] = sum(float(hidden[layer, b, t, j]) for t in range(length)) / length
    assert max_diff(mean_pool(hidden, mask), expected) < 1e-6
    assert max_diff(mean_pool(tuple(hidden), mask), expected) < 1e-6  # the tuple a model returns


def test_mean_pool_accumulates_half_precision_in_float32():
    # 4,000 tokens of 30.0: the sum (120,000) is past float16's largest value (65,504)
    hidden = torch.full((1, 1, 4000, 3), 30.0, dtype=torch.float16)
    mask = torch.ones(1, 4000, dtype=torch.long)
    assert not torch.isfinite(hidden.sum(2)).all()  # what summing in float16 would give
    pooled = mean_pool(hidden, mask)
    assert pooled.dtype == torch.float32 and torch.equal(pooled, torch.full((1, 1, 3), 30.0))


def test_mean_pool_refuses_an_empty_sentence():
    with pytest.raises(ValueError, match="no token"):
        mean_pool(torch.zeros(1, 2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]))


# -- the fast path --------------------------------------------------------------------------------

def independent_encoding(model, tokenizer, sentence: str) -> torch.Tensor:
    """One sentence alone, no padding, through the stock forward: the plain mean over its tokens."""
    ids = torch.tensor([tokenizer(sentence)["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    return torch.stack([h[0].mean(0) for h in hidden])  # [layers+1, d]


def test_encode_matches_each_sentence_encoded_alone(model, tokenizer):
    out = encode(model, tokenizer, SENTENCES + [LONG], batch_size=64, pooling="mean")
    assert out.shape == (LAYERS + 1, len(SENTENCES) + 1, HIDDEN) and out.dtype == torch.float32
    for i, sentence in enumerate(SENTENCES + [LONG]):
        assert max_diff(out[:, i], independent_encoding(model, tokenizer, sentence)) < 1e-5
    assert max_diff(out[0, 0], out[0, 1]) > 1e-2  # different sentences, different vectors


def test_padding_does_not_change_a_sentence(model, tokenizer):
    alone = encode(model, tokenizer, ["a dog."], batch_size=64, pooling="mean")
    with_long = encode(model, tokenizer, ["a dog.", LONG], batch_size=2, pooling="mean")  # padded to LONG's length
    assert len(tokenizer(LONG)["input_ids"]) > 5 * len(tokenizer("a dog.")["input_ids"])
    assert max_diff(alone[:, 0], with_long[:, 0]) < 1e-5


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_and_order_do_not_change_results(model, tokenizer, batch_size):
    reference = encode(model, tokenizer, SENTENCES, batch_size=64, pooling="mean")
    assert max_diff(encode(model, tokenizer, SENTENCES, batch_size=batch_size, pooling="mean"), reference) < 1e-5
    reversed_out = encode(model, tokenizer, SENTENCES[::-1], batch_size=batch_size, pooling="mean")
    assert max_diff(reversed_out.flip(1), reference) < 1e-5


@pytest.mark.parametrize("batch_size", [2, 64])
def test_encode_equals_the_naive_loop(model, tokenizer, batch_size):
    fast = encode(model, tokenizer, SENTENCES + [LONG], batch_size=batch_size, pooling="mean")
    naive = encode_naive(model, tokenizer, SENTENCES + [LONG], batch_size=batch_size)
    assert naive.shape == fast.shape
    assert max_diff(fast, naive) < 1e-5


def test_base_model_and_no_lm_head(model, tokenizer):
    handle = model.lm_head.register_forward_hook(lambda *args: pytest.fail("encode ran the LM head"))
    try:
        out = encode(model, tokenizer, SENTENCES, batch_size=64, pooling="mean")
    finally:
        handle.remove()
    assert isinstance(model.base_model, XLMRobertaModel)
    assert max_diff(encode(model.base_model, tokenizer, SENTENCES, batch_size=64, pooling="mean"), out) < 1e-6


def test_truncates_to_the_position_embeddings(model, tokenizer):
    very_long = " ".join(WORDS * 20)  # ~200 tokens, far past the 38 positions
    out = encode(model, tokenizer, [very_long, "cat"], batch_size=64, pooling="mean")
    assert out.shape == (LAYERS + 1, 2, HIDDEN) and torch.isfinite(out).all()
    ids = tokenizer(very_long, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    assert len(ids) == MAX_TOKENS and ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert max_diff(out[:, 0], torch.stack([h[0].mean(0) for h in hidden])) < 1e-5
    short = encode(model, tokenizer, [very_long], max_length=8, batch_size=64, pooling="mean")
    assert max_diff(short[:, 0], out[:, 0]) > 1e-3


def test_dropout_is_off_and_the_mode_is_restored(tokenizer):
    model = tiny_model(tokenizer, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    first = encode(model, tokenizer, SENTENCES, batch_size=64, pooling="mean")
    assert model.training
    assert torch.equal(first, encode(model, tokenizer, SENTENCES, batch_size=64, pooling="mean"))
    assert not first.is_inference()  # usable outside inference mode


def test_half_precision_model_gives_float32(model, tokenizer):
    reference = encode(model, tokenizer, SENTENCES, batch_size=64, pooling="mean")
    half = encode(copy.deepcopy(model).to(torch.bfloat16), tokenizer, SENTENCES, batch_size=64, pooling="mean")
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    # bfloat16 keeps 8 significant bits; errors compound over the layers but stay at the percent level
    assert max_diff(half, reference) < 0.05 * float(reference.abs().max())


def test_mixed_precision_forward_is_torch_autocast(model, tokenizer, monkeypatch):
    """encode's precision=bf16: the forward passes under torch.autocast (bfloat16 products, float32 norms), pooled in
    float32. It is the naive per-sentence loop run under torch.autocast itself (up to bfloat16's rounding of
    differently batched products: far closer to it than to fp32), sits below the percent level from fp32, and is not the fp32 result (the products did
    run in 16 bits). On a CPU without bfloat16 products the stage refuses it; here it is let through, emulated."""
    from xlsub import devices

    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: True)
    exact = encode(model, tokenizer, SENTENCES, batch_size=4, pooling="mean")
    mixed = encode(model, tokenizer, SENTENCES, batch_size=4, pooling="mean", precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = encode_naive(model, tokenizer, SENTENCES)
    assert mixed.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    scale = float(exact.abs().max())
    assert 1e-4 * scale < max_diff(mixed, exact) < 0.05 * scale, (max_diff(mixed, exact), scale)  # 0.4% here
    assert max_diff(mixed, naive) < 0.25 * max_diff(mixed, exact), (max_diff(mixed, naive), max_diff(mixed, exact))  # 0 here
    assert torch.equal(encode(model, tokenizer, SENTENCES, batch_size=4, pooling="mean", precision="fp32"), exact)
    monkeypatch.setattr(devices, "native_16bit_products", lambda dtype: False)
    with pytest.raises(XlsubError, match="^precision: this CPU has no bf16 products"):
        encode(model, tokenizer, SENTENCES, batch_size=4, pooling="mean", precision="bf16")


def test_no_sentences(model, tokenizer):
    assert encode(model, tokenizer, [], batch_size=64, pooling="mean").shape == (LAYERS + 1, 0, HIDDEN)
    assert encode_naive(model, tokenizer, []).shape == (LAYERS + 1, 0, HIDDEN)


@pytest.mark.parametrize(
    ("kwargs", "prefix"),
    [(dict(batch_size=0), "batch_size: "), (dict(max_length=MAX_TOKENS + 1), "max_length: "), (dict(max_length=1), "max_length: ")],
)
def test_bad_arguments(model, tokenizer, kwargs, prefix):
    with pytest.raises(XlsubError, match=f"^{prefix}"):
        encode(model, tokenizer, SENTENCES, **({"batch_size": 64, "pooling": "mean"} | kwargs))


# -- pruned subnetworks ---------------------------------------------------------------------------

def awkward_mask() -> torch.Tensor:
    """Layer 0 loses every head, layer 1 keeps heads 1 and 3."""
    mask = torch.ones(LAYERS, HEADS)
    mask[0] = 0
    mask[1, 0] = mask[1, 2] = 0
    return mask


def test_pruned_model_equals_the_gated_model(model, tokenizer, tmp_path):
    mask = awkward_mask()
    with HeadGates(model, mask):
        gated = encode(model, tokenizer, SENTENCES + [LONG], batch_size=4, pooling="mean")
    pruned = prune_heads(copy.deepcopy(model), mask)
    assert num_heads(pruned) == [0, 2]
    out = encode(pruned, tokenizer, SENTENCES + [LONG], batch_size=4, pooling="mean")
    assert out.shape == (LAYERS + 1, len(SENTENCES) + 1, HIDDEN) and torch.isfinite(out).all()
    assert max_diff(out, gated) < 1e-5
    assert max_diff(out, encode(model, tokenizer, SENTENCES + [LONG], batch_size=64, pooling="mean")) > 1e-3  # pruning changed something

    save_pruned(pruned, tmp_path / "subnetwork")
    reloaded = load_pruned(tmp_path / "subnetwork")
    assert max_diff(encode(reloaded, tokenizer, SENTENCES + [LONG], batch_size=64, pooling="mean"), gated) < 1e-5


# -- random control -------------------------------------------------------------------------------

def test_random_like(model, tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = random_like(model, seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = random_like(model, seed=1)
    c = random_like(model, seed=2)
    assert type(a) is type(model) and not a.training
    assert a.config.to_dict() == model.config.to_dict()
    weights = {name: p for name, p in model.named_parameters()}
    for name, p in a.named_parameters():
        assert p.shape == weights[name].shape
        assert torch.equal(p, dict(b.named_parameters())[name])
    w = "roberta.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(dict(a.named_parameters())[w], weights[w])
    assert not torch.equal(dict(a.named_parameters())[w], dict(c.named_parameters())[w])
    options = dict(batch_size=64, pooling="mean")
    assert max_diff(encode(a, tokenizer, SENTENCES, **options), encode(b, tokenizer, SENTENCES, **options)) == 0.0


def test_random_like_a_pruned_model_keeps_its_heads(model, tokenizer):
    pruned = prune_heads(copy.deepcopy(model), awkward_mask())
    fresh = random_like(pruned, seed=0)
    assert num_heads(fresh) == [0, 2]
    assert fresh.config.xlsub_kept_heads == pruned.config.xlsub_kept_heads
    assert torch.isfinite(encode(fresh, tokenizer, SENTENCES, batch_size=64, pooling="mean")).all()


# -- files ----------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    encodings = torch.randn(3, 7, 16) * 10
    save_encodings(encodings, tmp_path / "a" / "en.safetensors")
    loaded = load_encodings(tmp_path / "a" / "en.safetensors")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, encodings)

    save_encodings(encodings, tmp_path / "half.safetensors", dtype="float16")
    half = load_encodings(tmp_path / "half.safetensors")
    assert half.dtype == torch.float32 and half.shape == encodings.shape
    # float16 keeps 11 significant bits: relative rounding error at most 2^-11
    assert bool(((half - encodings).abs() <= encodings.abs() * 2**-11 + 1e-7).all())
    assert (tmp_path / "half.safetensors").stat().st_size < (tmp_path / "a" / "en.safetensors").stat().st_size


def test_file_errors(tmp_path):
    with pytest.raises(XlsubError, match="^dtype: "):
        save_encodings(torch.zeros(1, 2, 3), tmp_path / "x.safetensors", dtype="bfloat8")
    with pytest.raises(XlsubError, match="^dtype: .*overflow float16"):
        save_encodings(torch.full((1, 2, 3), 1e6), tmp_path / "x.safetensors", dtype="float16")
    with pytest.raises(XlsubError, match="^encodings: .* does not exist"):
        load_encodings(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(XlsubError, match="^encodings: .* not a readable safetensors file"):
        load_encodings(tmp_path / "junk.safetensors")


def test_mean_without_special_tokens_leaves_only_s_and_slash_s_out(model, tokenizer):
    """Each sentence alone through the stock model, hidden states averaged over its tokens but <s>, </s>."""
    got = encode(model, tokenizer, SENTENCES, batch_size=3, pooling="mean_no_special")
    for i, sentence in enumerate(SENTENCES):
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            states = model.base_model(input_ids=ids, output_hidden_states=True).hidden_states
        inner = torch.stack([h[0, 1:-1].mean(0) for h in states])  # <s> first, </s> last
        assert max_diff(got[:, i], inner) < 1e-5
    assert max_diff(got, encode(model, tokenizer, SENTENCES, batch_size=3, pooling="mean")) > 1e-3  # the specials did count before
    with pytest.raises(XlsubError, match="^pooling: "):
        encode(model, tokenizer, SENTENCES, pooling="max", batch_size=64)
