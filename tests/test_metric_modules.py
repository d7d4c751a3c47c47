"""xlsub's `evaluate` modules: loaded offline from their folders, equal to the library functions the stages
use and to an independent numpy computation."""

import math
import socket

import evaluate
import numpy as np
import pytest
import torch

import xlsub.metrics
from tests.test_mlm import toy_batch, toy_xlmr
from xlsub.models.mlm import masked_nll, masked_perplexity, perplexity
from xlsub.similarity.cka import cka


@pytest.fixture()
def offline(monkeypatch):
    """No network at all while the test runs: any connection attempt fails the test."""
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(name):
    return evaluate.load(xlsub.metrics.path(name))


def test_path_names_each_module_folder():
    for name in xlsub.metrics.NAMES:
        folder = xlsub.metrics.path(name)
        assert (xlsub.metrics.Path(folder) / f"{name}.py").is_file() and (xlsub.metrics.Path(folder) / "README.md").is_file()
    with pytest.raises(ValueError, match="no module 'bleu'"):
        xlsub.metrics.path("bleu")


# -- masked perplexity ----------------------------------------------------------------------------------

def numpy_masked_perplexity(logits, labels):
    """exp(mean NLL) over positions with a label other than -100, by hand in float64."""
    nll = []
    for sentence, ids in zip(logits, labels):
        sentence = np.asarray(sentence, dtype=np.float64)
        logp = sentence - sentence.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll += [-logp[t, i] for t, i in enumerate(ids) if i != -100]
    return math.exp(sum(nll) / len(nll)), len(nll)


def test_masked_perplexity_module_equals_library_and_hand_computation(offline):
    rng = np.random.default_rng(0)
    vocab = 7
    # two sentences of different lengths; -100 marks the positions that are not scored
    logits = [rng.normal(scale=3, size=(5, vocab)).astype(np.float32), rng.normal(scale=3, size=(3, vocab)).astype(np.float32)]
    labels = [[-100, 3, -100, 0, 6], [2, -100, -100]]
    result = load("masked_perplexity").compute(predictions=logits, references=labels)

    expected, n = numpy_masked_perplexity(logits, labels)
    assert result["masked_tokens"] == n == 4
    assert math.isclose(result["perplexity"], expected, rel_tol=1e-6)
    assert math.isclose(result["nll"], math.log(expected) * n, rel_tol=1e-6)

    nll, count = masked_nll(torch.cat([torch.from_numpy(x) for x in logits]), torch.tensor(labels[0] + labels[1]))
    assert count == 4 and result["perplexity"] == pytest.approx(masked_perplexity(float(nll), count), rel=1e-12)


def test_masked_perplexity_module_on_model_logits_equals_the_stages_perplexity(offline):
    """The module fed a model's full logits gives what finetune/prune log for the same batch."""
    model, batch = toy_xlmr(), toy_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    result = load("masked_perplexity").compute(predictions=list(logits.numpy()), references=list(batch["labels"].numpy()))
    assert result["masked_tokens"] == 4
    assert math.isclose(result["perplexity"], perplexity(model, [batch]), rel_tol=1e-5)


def test_masked_perplexity_without_masked_tokens_is_refused():
    with pytest.raises(ValueError, match="no masked tokens"):
        masked_perplexity(0.0, 0)


# -- CKA ------------------------------------------------------------------------------------------------

def numpy_cka(x, y, estimator):
    """CKA through n x n Gram matrices (Kornblith et al. 2019; unbiased HSIC_1 of Song et al. 2012)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)

    def gram(z):
        if estimator != "rbf":
            return z @ z.T
        sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
        sigma = np.median(np.sqrt(sq[np.triu_indices(n, 1)]))
        return np.exp(-sq / (2 * sigma**2))

    def hsic(k, l):
        if estimator == "debiased":
            k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
            one = np.ones(n)
            return (np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2))
                    - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))
        h = np.eye(n) - 1 / n
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = gram(x), gram(y)
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("estimator", ["linear", "debiased", "rbf"])
def test_cka_module_equals_library_and_gram_computation(offline, estimator):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 5))
    y = x @ rng.normal(size=(5, 3)) + 0.5 * rng.normal(size=(12, 3))  # related, of another width
    result = load("cka").compute(predictions=x, references=y, estimator=estimator)["cka"]
    assert result == pytest.approx(float(cka(torch.from_numpy(x), torch.from_numpy(y), estimator)), rel=1e-12)
    assert result == pytest.approx(numpy_cka(x, y, estimator), rel=1e-9)
    assert 0.2 < result < 1  # neither trivially 0 nor 1


def test_cka_module_default_is_debiased_and_refuses_unknown_estimator(offline):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    metric = load("cka")
    assert metric.compute(predictions=x, references=y)["cka"] == pytest.approx(numpy_cka(x, y, "debiased"), rel=1e-9)
    with pytest.raises(ValueError, match="unknown estimator 'cosine'"):
        metric.compute(predictions=x, references=y, estimator="cosine")
