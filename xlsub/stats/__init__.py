"""Inference over masks, perplexities and languages: intervals, overlap statistics, language distance."""
