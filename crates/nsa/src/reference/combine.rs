//! Gates (SPEC.md, "Output"): `o = gc * o_cmp + gs * o_slc + gw * o_win` per query head, the
//! gates being independent values (not normalised), and its backward.

/// The three branches in a fixed order: compressed, selected, window.
pub const BRANCHES: usize = 3;

/// `out[c] = sum_b gates[b] * branch[b][c]` for one head.
pub fn combine(gates: [f64; BRANCHES], branch: [&[f64]; BRANCHES], out: &mut [f64]) {
    for (c, o) in out.iter_mut().enumerate() {
        *o = (0..BRANCHES).map(|b| gates[b] * branch[b][c]).sum();
    }
}

/// Backward of [`combine`] for upstream `d_o`: returns `d gate_b = d_o . branch_b` and
/// `d branch_b = gate_b * d_o`.
pub fn combine_backward(
    gates: [f64; BRANCHES],
    branch: [&[f64]; BRANCHES],
    d_o: &[f64],
) -> ([f64; BRANCHES], [Vec<f64>; BRANCHES]) {
    let d_gate = std::array::from_fn(|b| d_o.iter().zip(branch[b]).map(|(x, y)| x * y).sum());
    let d_branch = std::array::from_fn(|b| d_o.iter().map(|x| gates[b] * x).collect());
    (d_gate, d_branch)
}
