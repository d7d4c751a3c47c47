"""Representation similarity (issue 12): CKA (`cka`), its permutation nulls and length control (`permutation`),
jackknife intervals (`jackknife`), translation retrieval (`retrieval`), RSA (`rsa`), planted controls (`controls`) and
kNN-graph isomorphism (`isomorphism`).

Representations are x, y [n, d] (or [..., n, d], e.g. one slice per layer) where row i of x and row i of y
encode translations of one sentence; every function is plain tensors in, tensors out, in float64, and none
touches files or MLflow.
"""
