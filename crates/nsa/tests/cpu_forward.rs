//! The CPU forward against the float64 reference (SPEC.md, "Numerics and tests").

mod cpu_common;
use cpu_common::*;

#[test]
fn forward_matches_reference_on_many_shapes() {
    for c in cases() {
        let got = nsa::cpu::forward(&c.cfg, &c.x, &c.phi).unwrap();
        let want = reference_forward(&c);
        check_selection(&c, &want.sel_idx, &got.sel_idx);
        assert_close(&format!("{} o", c.name), &got.o, &want.o, 1e-5);
    }
}
