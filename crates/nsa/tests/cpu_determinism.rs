//! Deterministic mode (SPEC.md): bitwise-identical outputs and gradients run after run and for
//! any rayon thread count. The case is long enough that the forced initial block is selected by
//! more queries than one backward task takes (the split-and-reduce path) and `phi` runs in
//! several chunks.

mod cpu_common;
use cpu_common::*;
use nsa::PhiKind;

fn run_in(threads: usize, c: &Case, d_o: &[f32]) -> (nsa::NsaOutput<f32>, nsa::NsaGrads<f32>) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let o = nsa::cpu::forward(&c.cfg, &c.x, &c.phi).unwrap();
        let g = nsa::cpu::backward(&c.cfg, &c.x, &c.phi, d_o).unwrap();
        (o, g)
    })
}

#[test]
fn bitwise_identical_for_1_and_3_threads_and_matches_reference() {
    let c = case(
        "long G=2 linear",
        cfg(4, 2, 8, 4, 16, 4, 32, PhiKind::Linear),
        &[1100, 37],
        16,
        8,
        false,
        11,
    );
    let d_o = random_grad(c.x.num_tokens() * c.cfg.heads * c.x.dv, 12);
    let (o1, g1) = run_in(1, &c, &d_o);
    let (o3, g3) = run_in(3, &c, &d_o);
    let (o3b, g3b) = run_in(3, &c, &d_o);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(o1.sel_idx, o3.sel_idx);
    assert_eq!(
        bits(&o1.o),
        bits(&o3.o),
        "forward differs between 1 and 3 threads"
    );
    assert_eq!(bits(&o3.o), bits(&o3b.o), "forward differs run to run");
    for (a, b, name) in [
        (&g1.dq, &g3.dq, "dq"),
        (&g1.dk_cmp, &g3.dk_cmp, "dk_cmp"),
        (&g1.dv_cmp, &g3.dv_cmp, "dv_cmp"),
        (&g1.dk_slc, &g3.dk_slc, "dk_slc"),
        (&g1.dv_slc, &g3.dv_slc, "dv_slc"),
        (&g1.dk_win, &g3.dk_win, "dk_win"),
        (&g1.dv_win, &g3.dv_win, "dv_win"),
        (&g1.dg_slc, &g3.dg_slc, "dg_slc"),
    ] {
        assert_eq!(bits(a), bits(b), "{name} differs between 1 and 3 threads");
    }
    assert_eq!(
        g1.dphi, g3.dphi,
        "phi gradients differ between 1 and 3 threads"
    );
    assert_eq!(g3, g3b, "gradients differ run to run");

    // The same long case against the reference (hot-block split, chunked phi).
    let want = reference_forward(&c);
    check_selection(&c, &want.sel_idx, &o1.sel_idx);
    assert_close("long o", &o1.o, &want.o, 1e-5);
    let d_o64: Vec<f64> = d_o.iter().map(|&v| v as f64).collect();
    let wg = nsa::reference::backward(&c.cfg, &c.x.map(f64::from), &c.phi.map(f64::from), &d_o64)
        .unwrap();
    assert_close("long dq", &g1.dq, &wg.dq, 1e-5);
    assert_close("long dk_slc", &g1.dk_slc, &wg.dk_slc, 1e-5);
    assert_close("long dv_slc", &g1.dv_slc, &wg.dv_slc, 1e-5);
    assert_close("long dk_cmp", &g1.dk_cmp, &wg.dk_cmp, 1e-5);
    assert_close("long dv_win", &g1.dv_win, &wg.dv_win, 1e-5);
    if let (nsa::PhiWeights::Linear { w: a, .. }, nsa::PhiWeights::Linear { w: b, .. }) =
        (&g1.dphi.v, &wg.dphi.v)
    {
        assert_close("long phi_v.w", a, b, 1e-5);
    } else {
        panic!("phi gradient kind");
    }
}
