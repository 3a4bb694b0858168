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

/// Group sizes that are not a multiple of the kernels' 8/16 lanes (G = 3: padding lanes in
/// every thin tile; G = 24: a 16-lane strip plus an 8-lane one, and tiles of 2 tokens = 48
/// lanes), forward and backward against the reference.
#[test]
fn odd_group_sizes_match_reference() {
    for (name, hq, hkv, lens) in [
        ("G=3", 6usize, 2usize, vec![71usize, 40]),
        ("G=24", 24, 1, vec![90]),
    ] {
        let c = case(
            name,
            cfg(hq, hkv, 8, 4, 16, 4, 24, nsa::PhiKind::Linear),
            &lens,
            16,
            8,
            false,
            61,
        );
        let got = nsa::cpu::forward(&c.cfg, &c.x, &c.phi).unwrap();
        let want = reference_forward(&c);
        check_selection(&c, &want.sel_idx, &got.sel_idx);
        assert_close(&format!("{name} o"), &got.o, &want.o, 1e-5);
        let d_o = random_grad(c.x.num_tokens() * hq * c.x.dv, 62);
        let g = nsa::cpu::backward(&c.cfg, &c.x, &c.phi, &d_o).unwrap();
        let d_o64: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
        let wg =
            nsa::reference::backward(&c.cfg, &c.x.map(f64::from), &c.phi.map(f64::from), &d_o64)
                .unwrap();
        assert_close(&format!("{name} dq"), &g.dq, &wg.dq, 1e-5);
        assert_close(&format!("{name} dk_slc"), &g.dk_slc, &wg.dk_slc, 1e-5);
        assert_close(&format!("{name} dv_win"), &g.dv_win, &wg.dv_win, 1e-5);
        assert_close(&format!("{name} dk_cmp"), &g.dk_cmp, &wg.dk_cmp, 1e-5);
    }
}
