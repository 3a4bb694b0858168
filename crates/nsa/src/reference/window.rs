//! Sliding-window branch (SPEC.md, "Sliding window branch"): the query at `t` reads the keys
//! `max(0, t - w + 1) ..= t`, exactly `w` tokens once `t >= w - 1`, its own included.

use crate::blocks;
use crate::config::NsaConfig;

/// The key positions of the window of the query at `t`, ascending.
pub fn window_keys(cfg: &NsaConfig, t: usize) -> Vec<usize> {
    (blocks::window_start(t, cfg.window)..=t).collect()
}
