"""Everything said to MLflow: stage runs, lineage by run ID, code versions, the server check, signals, fan-out."""
