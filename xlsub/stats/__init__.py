"""Inference over masks, perplexities and languages: language-level tests and intervals (`inference`),
intervals over chunks, overlap statistics, language distance."""
