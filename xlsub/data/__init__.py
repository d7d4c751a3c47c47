"""Text: the embedded corpus and the loaders, parallel text, LM chunks and masking."""
