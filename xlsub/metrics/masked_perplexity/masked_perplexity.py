"""Masked-LM perplexity as an `evaluate` metric: exp(sum of masked-token NLL / number of masked tokens).

The numbers come from `xlsub.models.mlm.masked_nll` and `xlsub.models.mlm.masked_perplexity`, the functions behind the
perplexities finetune and prune log, so the metric and the stages cannot drift apart.
"""

import datasets
import evaluate
import numpy
import torch

from xlsub.models.mlm import masked_nll, masked_perplexity

_DESCRIPTION = (
    "Perplexity of a masked language model over its masked tokens: exp of the mean negative log-likelihood "
    "of the true token at every position whose label is not -100. The mean is over tokens, not sentences."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: one [positions, vocab] array of logits per sentence (log-probabilities give the same result).
    references: one [positions] array of token ids per sentence, -100 where a position is not scored,
        as `transformers.DataCollatorForLanguageModeling` writes `labels`.
Returns:
    perplexity: exp(summed NLL / masked_tokens).
    nll: the summed negative log-likelihood (nats).
    masked_tokens: how many positions were scored.
Example:
    >>> import evaluate, xlsub.metrics
    >>> metric = evaluate.load(xlsub.metrics.path("masked_perplexity"))
    >>> metric.compute(predictions=[[[0.0, 0.0], [5.0, 0.0]]], references=[[-100, 1]])["masked_tokens"]
    1
"""

_CITATION = """
@inproceedings{devlin2019bert,
  title={{BERT}: Pre-training of Deep Bidirectional Transformers for Language Understanding},
  author={Devlin, Jacob and Chang, Ming-Wei and Lee, Kenton and Toutanova, Kristina},
  booktitle={NAACL}, year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                "references": datasets.Sequence(datasets.Value("int64")),
            }),
            reference_urls=["https://github.com/huggingface/transformers/blob/main/examples/pytorch/language-modeling/run_mlm.py"],
        )

    def _compute(self, predictions, references):
        # sentences may differ in length: their positions are concatenated, which is all a mean over tokens needs
        logits = torch.cat([torch.as_tensor(numpy.asarray(p, dtype=numpy.float32)).reshape(len(r), -1)
                            for p, r in zip(predictions, references)])
        labels = torch.cat([torch.as_tensor(numpy.asarray(r, dtype=numpy.int64)) for r in references])
        if labels.numel() and int(labels.max()) >= logits.shape[-1]:
            raise ValueError(f"masked_perplexity: a label is {int(labels.max())}, but the logits have {logits.shape[-1]} classes")
        nll, n = masked_nll(logits, labels)
        return {"perplexity": masked_perplexity(float(nll), n), "nll": float(nll), "masked_tokens": n}
