"""Representation similarity: CKA, its permutation nulls and jackknife, retrieval, RSA, kNN-graph isomorphism, planted controls."""
