//! Decoding on f32 (to be written).
