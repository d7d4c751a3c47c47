"""Model families and what is done to them: loading, head gates and importance, pruning and surgery, the masked-LM loss, training, encoding."""
