import argparse
import time

import pytest
from transformers import XLMRobertaTokenizer

from xlsub.data.corpus import load_corpus
from xlsub.devices import resolve_device
from xlsub.errors import XlsubError
from xlsub.models.hub import is_hub_id, looks_local
from xlsub.models.loading import load_pretrained, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def texts():
    corpus = load_corpus("embedded", ["en", "zh", "hi"])
    return list(corpus.texts["train"]["text"])


def test_raw_unigram_trainer_is_not_reproducible_but_train_tokenizer_is(texts):
    # The raw trainer appends required characters in hash-set order: ids differ between two trainings.
    raw = [XLMRobertaTokenizer().train_new_from_iterator(texts, vocab_size=3000).get_vocab() for _ in range(2)]
    assert raw[0] != raw[1]
    a, b = train_tokenizer(texts, vocab_size=3000), train_tokenizer(texts, vocab_size=3000)
    assert a.get_vocab() == b.get_vocab()
    assert set(a.get_vocab()) == set(raw[0])  # same pieces, only their order is fixed
    assert a.convert_ids_to_tokens(list(range(5))) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's specials


def test_tiny_model_shape(texts):
    tokenizer = train_tokenizer(texts[:2000], vocab_size=500)
    model = tiny_model(tokenizer, max_seq_len=64)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (128, 4, 8, 512)
    assert c.num_hidden_layers * c.num_attention_heads >= 32
    assert c.vocab_size == len(tokenizer) and c.max_position_embeddings == 64 + 2


def test_missing_local_model_fails_at_once(tmp_path):
    start = time.perf_counter()
    for name in ["./no/such/model", str(tmp_path / "absent"), "~/no-such-model-folder"]:
        with pytest.raises(XlsubError, match="^model: "):
            load_pretrained(name)
    with pytest.raises(XlsubError, match="^model: "):
        load_pretrained("not a hub id!")
    assert time.perf_counter() - start < 5  # no hub retries


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    assert is_hub_id("FacebookAI/xlm-roberta-base") and is_hub_id("gpt2")  # with or without an owner
    for name in ("a/b/c", "not a hub id!", "./model", "-x/y"):
        assert not is_hub_id(name), name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./model", ".model", "/abs/model", "~/model", "runs/absent"):
        assert looks_local(name), name
    for name in ("FacebookAI/xlm-roberta-base", "gpt2", "models/absent"):  # no folder "models" here
        assert not looks_local(name), name


def test_unknown_device():
    with pytest.raises(XlsubError, match="^device: unknown"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"


def test_base_shape_model_has_xlmr_base_layers_and_counts_its_parameters(texts):
    from xlsub.models.loading import BASE_SHAPE, XLMR_VOCAB_SIZE, is_scratch, scratch_model

    tokenizer = train_tokenizer(texts[:2000], vocab_size=500)
    assert is_scratch("tiny") and is_scratch(BASE_SHAPE) and not is_scratch("FacebookAI/xlm-roberta-base")
    model = scratch_model(BASE_SHAPE, tokenizer, max_seq_len=512)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert c.vocab_size == len(tokenizer) and c.max_position_embeddings == 512 + 2
    # XLM-R base has ~278M parameters; 250,002 x 768 of them are the (tied) embedding
    layers = sum(p.numel() for p in model.roberta.encoder.parameters())
    assert 84e6 < layers < 86e6  # 12 x (4 x 768^2 + 2 x 768 x 3072 + biases and norms)
    full_vocab = scratch_model(BASE_SHAPE, tokenizer, max_seq_len=512, vocab_size=XLMR_VOCAB_SIZE)
    assert full_vocab.roberta.embeddings.word_embeddings.weight.shape == (XLMR_VOCAB_SIZE, 768)


def test_gpu_benchmark_runs_its_stages_on_cpu_in_smoke_mode(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(root / "benchmarks/gpu.py"), "--device", "cpu", "--smoke", "--json", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    result = json.loads(out.read_text())
    rows = result["rows"]
    import torch

    from xlsub.devices import native_16bit_products

    bf16 = native_16bit_products(torch.bfloat16)  # the bf16 importance pass and encode only where the CPU multiplies bfloat16 itself
    first = ["finetune fp32", "finetune fp32 compiled", "finetune fp32 compiled", "prune (importance pass, fp32)",
             *(["prune (importance pass, bf16)"] if bf16 else []), "encode (fp32)", *(["encode (bf16)"] if bf16 else [])]
    assert [r["stage"] for r in rows[:len(first)]] == first
    assert [r["stage"].split()[0] for r in rows[len(first):]] == ["finetune", "prune", "encode"]
    assert [r["batch"] for r in rows[:3]] == [4, 4, 8] and [r["compiled"] for r in rows[:3]] == [False, True, True]
    assert {r["optim"] for r in rows[:3]} == {"adamw_torch_fused"} and rows[0]["attention"] == "sdpa"
    assert all(r["rate"] > 0 for r in rows) and all(r["stage"].endswith("(decoder)") for r in rows[len(first):])
    # MFU: the stage's model FLOPs per second over the matrix-product rate measured in the same process. Other load on
    # the machine can take the cores from one measurement and not the other, so on a shared CPU the ratio is only
    # bounded loosely; the accounting itself is checked exactly.
    peak = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    for r in rows:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / (result["matmul_tflops"][peak[r["precision"]]] * 1e12), rel=1e-12)
        assert 0 < r["mfu"] < 3
    no_cuda = subprocess.run(["bash", str(root / "benchmarks/gpu.sh")], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert no_cuda.returncode == 0 and "no CUDA device" in no_cuda.stdout


def test_gpu_benchmark_counts_a_decoders_training_flops_from_its_shape():
    """benchmarks/gpu.py's FLOPs per token for tiny-qwen2, against the count from the Qwen2 layer shapes:
    q/k/v with biases, o, the gated MLP's three matrices, two norms a layer and the final norm; the tied LM
    head at every position; attention's 12 x layers x seq x hidden."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu

    tokenizer = gpu.synthetic_tokenizer(500)
    model = gpu.decoder_model(argparse.Namespace(smoke=True, seq=32), tokenizer)
    c = model.config
    h, i, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    expected = 6 * (layers * per_layer + h) + 6 * h * vocab * 1.0 + 12 * layers * 32 * h
    assert gpu.train_flops_per_token(model, 32, 1.0) == expected
    # the importance pass: no weight gradients; encode: a forward pass without the LM head
    assert gpu.model_flops_per_token(model, 32, 1.0, "gates") == 4 * (layers * per_layer + h) + 4 * h * vocab + 12 * layers * 32 * h
    assert gpu.model_flops_per_token(model, 20, 0.0, "forward") == 2 * (layers * per_layer + h) + 4 * layers * 20 * h
