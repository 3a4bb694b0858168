//! float64 reference (to be written)
