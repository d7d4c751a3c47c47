import math

import torch
from transformers import BertConfig, BertForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

from xlsub.data.lm import chunk_ids, unigram_perplexity
from xlsub.models.mlm import masked_forward, masked_lm_loss, perplexity


def toy_xlmr(seed=0):
    torch.manual_seed(seed)
    config = XLMRobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=32, max_position_embeddings=20, pad_token_id=1)
    return XLMRobertaForMaskedLM(config).eval()


def toy_batch(seed=1, batch=3, length=10, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    ids[0, 7:] = 1  # padding
    attention[0, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 0], labels[1, 5], labels[2, 9] = 11, 12, 13, 14
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def test_perplexity_matches_hand_computation_from_full_logits():
    model, batch = toy_xlmr(), toy_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits, dim=-1)
    nll = [-logp[b, t, batch["labels"][b, t]].item() for b, t in [(0, 2), (1, 0), (1, 5), (2, 9)]]
    expected = math.exp(sum(nll) / 4)
    assert math.isclose(perplexity(model, [batch]), expected, rel_tol=1e-5)
    # two batches: mean over tokens, not over batches
    other = toy_batch(seed=2)
    other["labels"][:] = -100
    other["labels"][2, 3] = 20
    with torch.no_grad():
        lp2 = torch.log_softmax(model(input_ids=other["input_ids"], attention_mask=other["attention_mask"]).logits, -1)
    nll.append(-lp2[2, 3, 20].item())
    assert math.isclose(perplexity(model, [batch, other]), math.exp(sum(nll) / 5), rel_tol=1e-5)


def test_masked_only_loss_equals_stock_loss_for_xlmr_and_bert():
    batch = toy_batch()
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=32, max_position_embeddings=20)).eval()
    for model in (toy_xlmr(), bert):
        stock = model(**batch).loss
        loss, n = masked_lm_loss(model, batch)
        assert n == 4
        assert torch.allclose(loss / n, stock, atol=1e-6)
        with masked_forward(model):
            assert torch.allclose(model(**batch).loss, stock, atol=1e-6)
        assert model(**batch).logits.shape == (3, 10, 40)  # stock forward is back


def test_chunk_ids_concatenates_with_eos_and_wraps_blocks():
    chunks = chunk_ids([[5, 6, 7], [], [8, 9]], max_seq_len=5, bos=0, eos=2)
    # stream 5 6 7 </s> 8 9 </s>, blocks of 3
    assert chunks == [[0, 5, 6, 7, 2], [0, 2, 8, 9, 2], [0, 2, 2]]


def test_unigram_perplexity_by_hand():
    train = [[0, 5, 5, 6, 2]]  # specials 0 and 2 are not counted: 5 twice, 6 once
    labels = torch.full((1, 4), -100)
    labels[0, 1], labels[0, 2] = 5, 7
    vocab = 10
    total = 3 + vocab
    expected = math.exp(-(math.log(3 / total) + math.log(1 / total)) / 2)
    got = unigram_perplexity(train, [{"labels": labels}], vocab, special_ids={0, 2})
    assert math.isclose(got, expected, rel_tol=1e-12)
