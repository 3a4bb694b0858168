//! Dense causal attention baseline (to be written).
