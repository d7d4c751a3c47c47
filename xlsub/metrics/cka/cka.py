"""Centred kernel alignment (Kornblith et al. 2019) as an `evaluate` metric, computed by `xlsub.similarity.cka.cka`,
the function behind the CKA the analyze stage reports.
"""

import datasets
import evaluate
import torch

from xlsub.similarity.cka import KINDS, cka

_DESCRIPTION = (
    "CKA between two representations of the same sentences, one row per sentence: 1 for representations that "
    "agree up to rotation and isotropic scaling, near 0 for unrelated ones. Estimators: linear (biased HSIC), "
    "debiased (unbiased HSIC_1, Song et al. 2012; Nguyen et al. 2021) and rbf (Gaussian kernel, bandwidth "
    "sigma_frac x the median distance between distinct sentences)."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions: the first representation, one vector (d1 floats) per sentence.
    references: the second representation of the same sentences in the same order, one vector (d2 floats)
        per sentence; d2 may differ from d1.
    estimator: debiased (default, as in the analyze stage; needs at least 4 sentences), linear or rbf.
    sigma_frac: rbf bandwidth as a fraction of the median pairwise distance (default 1.0).
Returns:
    cka: the CKA, NaN where a representation is constant over the sentences.
Example:
    >>> import evaluate, xlsub.metrics
    >>> metric = evaluate.load(xlsub.metrics.path("cka"))
    >>> round(metric.compute(predictions=[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], references=[[2.0], [0.5], [3.0]], estimator="linear")["cka"], 4)
    0.501
"""

_CITATION = """
@inproceedings{kornblith2019similarity,
  title={Similarity of Neural Network Representations Revisited},
  author={Kornblith, Simon and Norouzi, Mohammad and Lee, Honglak and Hinton, Geoffrey},
  booktitle={ICML}, year={2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CKA(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("float64")),
            }),
            reference_urls=["https://arxiv.org/abs/1905.00414"],
        )

    def _compute(self, predictions, references, estimator="debiased", sigma_frac=1.0):
        if estimator not in KINDS:
            raise ValueError(f"cka: unknown estimator '{estimator}'; use {', '.join(KINDS)}")
        x = torch.as_tensor(predictions, dtype=torch.float64)
        y = torch.as_tensor(references, dtype=torch.float64)
        return {"cka": float(cka(x, y, estimator, sigma_frac=sigma_frac))}
