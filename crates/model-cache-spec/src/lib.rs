//! ModelCacheSpec: the KV-cache shape of a model and its capacity maths (pure domain).
