"""The training objective of stage two.

- `terms`: the pure loss terms (sparse KL to the fused target, next-token CE, DKD, the feature term), float32,
  masked, averaged over valid positions.
- `objective`: `DistillLoss`, the weighted sum lambda * KD + (1 - lambda) * CE + gamma * feature, and its
  `LossTerms`.
- `chunked`: CE and KD from the final hidden states in chunks of positions (no [B·L, V] logits).
"""
