"""The learned strength predictors' experiments: `label` (measured labels), `train` (fit and ship the
predictors) and `eval` (held-out sessions: learned against fixed strengths and the heuristic)."""
