//! The gates (SPEC.md, "Output"): `o = gc * o_cmp + gs * o_slc + gw * o_win`, the gates being
//! independent values in [0, 1]; and their gradients `dg_b = dot(dO, o_b)`, which also give
//! the backward's `delta_b = dot(g_b dO, o_b) = g_b * dg_b`.

/// Mixes the three branch outputs of `rows` (token, head) rows of width `dv`.
pub(crate) fn mix(gates: [&[f32]; 3], branch: [&[f32]; 3], o: &mut [f32], dv: usize) {
    for (r, out) in o.chunks_exact_mut(dv).enumerate() {
        let (gc, gs, gw) = (gates[0][r], gates[1][r], gates[2][r]);
        let (c, s, w) = (
            &branch[0][r * dv..(r + 1) * dv],
            &branch[1][r * dv..(r + 1) * dv],
            &branch[2][r * dv..(r + 1) * dv],
        );
        for (((o, &c), &s), &w) in out.iter_mut().zip(c).zip(s).zip(w) {
            *o = gc * c + gs * s + gw * w;
        }
    }
}

/// For every (token, head) row: `dg[b][r] = dot(dO_r, o_b_r)` and `delta[b][r] = g_b[r] * dg[b][r]`.
pub(crate) fn gate_grads(
    gates: [&[f32]; 3],
    branch: [&[f32]; 3],
    d_o: &[f32],
    dv: usize,
    dg: [&mut [f32]; 3],
    delta: [&mut [f32]; 3],
) {
    for (k, (dgk, dk)) in dg.into_iter().zip(delta).enumerate() {
        for (r, (g_out, d_out)) in dgk.iter_mut().zip(dk.iter_mut()).enumerate() {
            let v = super::tile::dot(&d_o[r * dv..(r + 1) * dv], &branch[k][r * dv..(r + 1) * dv]);
            *g_out = v;
            *d_out = gates[k][r] * v;
        }
    }
}
