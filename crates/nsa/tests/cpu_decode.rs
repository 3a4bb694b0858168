//! CPU decoding: a batch of sequences of different lengths (one empty, one shorter than `l`),
//! prefilled (once in one piece, once in two chunks) and then stepped one token each; every
//! step row must equal the forward's row of the whole sequence (SPEC.md, "Decoding").

mod cpu_common;
use cpu_common::*;
use nsa::cache::DecodeCache;
use nsa::{NsaInputs, PhiKind};

/// Tokens `a..e` of sequence `b` of `x` as a one-sequence batch.
fn slice(x: &NsaInputs<f32>, b: usize, a: usize, e: usize) -> NsaInputs<f32> {
    let s = x.sequence(b);
    let n = s.num_tokens();
    let cut = |v: &Vec<f32>| {
        let per = v.len() / n;
        v[a * per..e * per].to_vec()
    };
    NsaInputs {
        dk: s.dk,
        dv: s.dv,
        cu_seqlens: vec![0, e - a],
        q: cut(&s.q),
        k_cmp: cut(&s.k_cmp),
        v_cmp: cut(&s.v_cmp),
        k_slc: cut(&s.k_slc),
        v_slc: cut(&s.v_slc),
        k_win: cut(&s.k_win),
        v_win: cut(&s.v_win),
        g_cmp: cut(&s.g_cmp),
        g_slc: cut(&s.g_slc),
        g_win: cut(&s.g_win),
    }
}

/// Token `t` of every sequence, as a decode-step batch.
fn step_batch(x: &NsaInputs<f32>, ts: &[usize]) -> NsaInputs<f32> {
    let parts: Vec<NsaInputs<f32>> = ts
        .iter()
        .enumerate()
        .map(|(b, &t)| slice(x, b, t, t + 1))
        .collect();
    let cat = |f: &dyn Fn(&NsaInputs<f32>) -> &Vec<f32>| {
        parts
            .iter()
            .flat_map(|p| f(p).iter().copied())
            .collect::<Vec<f32>>()
    };
    NsaInputs {
        dk: x.dk,
        dv: x.dv,
        cu_seqlens: (0..=ts.len()).collect(),
        q: cat(&|p| &p.q),
        k_cmp: cat(&|p| &p.k_cmp),
        v_cmp: cat(&|p| &p.v_cmp),
        k_slc: cat(&|p| &p.k_slc),
        v_slc: cat(&|p| &p.v_slc),
        k_win: cat(&|p| &p.k_win),
        v_win: cat(&|p| &p.v_win),
        g_cmp: cat(&|p| &p.g_cmp),
        g_slc: cat(&|p| &p.g_slc),
        g_win: cat(&|p| &p.g_win),
    }
}

fn decode_matches_forward(c: &Case, prefix: &[usize], steps: usize) {
    let x = &c.x;
    let full = nsa::cpu::forward(&c.cfg, x, &c.phi).unwrap();
    let (hq, hkv, dv, n) = (c.cfg.heads, c.cfg.kv_heads, x.dv, c.cfg.sel_count);
    let mut cache = DecodeCache::<f32>::new(&c.cfg, prefix.len(), x.dk, x.dv).unwrap();
    for (b, &p) in prefix.iter().enumerate() {
        if p == 0 {
            continue;
        }
        // Sequence 1 is prefilled in two chunks (the second on a non-empty cache).
        let cuts: Vec<(usize, usize)> = if b == 1 && p > 3 {
            vec![(0, p / 2), (p / 2, p)]
        } else {
            vec![(0, p)]
        };
        for (a, e) in cuts {
            let out = nsa::cpu::decode::prefill(&c.cfg, &mut cache, b, &slice(x, b, a, e), &c.phi)
                .unwrap();
            let s0 = x.cu_seqlens[b] + a;
            let want = &full.o[s0 * hq * dv..(s0 + e - a) * hq * dv];
            assert_close(
                &format!("{} prefill seq {b} [{a},{e})", c.name),
                &out.o,
                &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                1e-5,
            );
        }
    }
    for k in 0..steps {
        let ts: Vec<usize> = prefix.iter().map(|&p| p + k).collect();
        let xs = step_batch(x, &ts);
        let out = nsa::cpu::decode::step(&c.cfg, &mut cache, &xs, &c.phi).unwrap();
        for (b, &t) in ts.iter().enumerate() {
            let i = x.cu_seqlens[b] + t;
            let want: Vec<f64> = full.o[i * hq * dv..(i + 1) * hq * dv]
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert_close(
                &format!("{} step seq {b} t={t}", c.name),
                &out.o[b * hq * dv..(b + 1) * hq * dv],
                &want,
                1e-5,
            );
            assert_eq!(
                &out.sel_idx[b * hkv * n..(b + 1) * hkv * n],
                &full.sel_idx[i * hkv * n..(i + 1) * hkv * n],
                "{}: sel_idx of seq {b} t={t}",
                c.name
            );
        }
    }
    assert_eq!(
        cache.lens(),
        prefix.iter().map(|&p| p + steps).collect::<Vec<_>>()
    );
}

#[test]
fn batched_steps_equal_forward_rows() {
    let prefix = [0usize, 9, 40, 77];
    let steps = 21;
    let lens: Vec<usize> = prefix.iter().map(|&p| p + steps).collect();
    for (name, phi, hq, hkv, dk, dv) in [
        ("G=2 linear", PhiKind::Linear, 4, 2, 16, 8),
        ("G=4 mlp", PhiKind::Mlp, 4, 1, 8, 12),
        ("G=1 mean", PhiKind::Mean, 2, 2, 8, 8),
    ] {
        let c = case(
            name,
            cfg(hq, hkv, 8, 4, 16, 4, 24, phi),
            &lens,
            dk,
            dv,
            false,
            21,
        );
        decode_matches_forward(&c, &prefix, steps);
    }
}

#[test]
fn step_agrees_with_reference_decode() {
    let prefix = [3usize, 50];
    let lens = [prefix[0] + 5, prefix[1] + 5];
    let c = case(
        "ref",
        cfg(4, 2, 8, 4, 16, 4, 24, PhiKind::Mlp),
        &lens,
        8,
        8,
        false,
        31,
    );
    let phi64 = c.phi.map(f64::from);
    let mut c32 = DecodeCache::<f32>::new(&c.cfg, 2, 8, 8).unwrap();
    let mut c64 = DecodeCache::<f64>::new(&c.cfg, 2, 8, 8).unwrap();
    for (b, &p) in prefix.iter().enumerate() {
        nsa::cpu::decode::prefill(&c.cfg, &mut c32, b, &slice(&c.x, b, 0, p), &c.phi).unwrap();
        nsa::reference::decode::prefill(
            &c.cfg,
            &mut c64,
            b,
            &slice(&c.x, b, 0, p).map(f64::from),
            &phi64,
        )
        .unwrap();
    }
    for k in 0..5 {
        let ts: Vec<usize> = prefix.iter().map(|&p| p + k).collect();
        let xs = step_batch(&c.x, &ts);
        let got = nsa::cpu::decode::step(&c.cfg, &mut c32, &xs, &c.phi).unwrap();
        let want =
            nsa::reference::decode::step(&c.cfg, &mut c64, &xs.map(f64::from), &phi64).unwrap();
        assert_close(&format!("step {k}"), &got.o, &want.o, 1e-5);
        assert_eq!(got.sel_idx, want.sel_idx, "step {k}");
    }
    // Compressed K/V in the caches agree too (phi of f32 vs f64).
    for b in 0..2 {
        assert_close(
            "k_cmp cache",
            c32.seqs[b].k_cmp(),
            c64.seqs[b].k_cmp(),
            1e-5,
        );
    }
}

#[test]
fn step_rejects_bad_batches() {
    let c = case(
        "bad",
        cfg(4, 2, 8, 4, 16, 4, 24, PhiKind::Mean),
        &[3, 3],
        8,
        8,
        false,
        41,
    );
    let mut cache = DecodeCache::<f32>::new(&c.cfg, 3, 8, 8).unwrap();
    let xs = step_batch(&c.x, &[0, 0]);
    assert!(matches!(
        nsa::cpu::decode::step(&c.cfg, &mut cache, &xs, &c.phi),
        Err(nsa::NsaError::Decode(_))
    ));
    assert!(matches!(
        nsa::cpu::decode::prefill(&c.cfg, &mut cache, 7, &slice(&c.x, 0, 0, 3), &c.phi),
        Err(nsa::NsaError::Decode(_))
    ));
    assert!(matches!(
        nsa::cpu::decode::prefill(&c.cfg, &mut cache, 0, &c.x, &c.phi),
        Err(nsa::NsaError::Decode(_))
    ));
}

/// Steps split into small key chunks (flash-decoding: several chunks per branch, merged in
/// order) still equal the forward's rows, and are bitwise identical for 1 and 3 threads.
#[test]
fn split_steps_equal_forward_rows_for_any_thread_count() {
    // 8 (sequence, group) pairs: the per-pair phases run in parallel.
    split_steps(&[0, 9, 40, 77], 2);
    // One pair (one sequence, one KV head): they run inline.
    split_steps(&[61], 1);
}

fn split_steps(prefix: &[usize], hkv: usize) {
    let steps = 6;
    let lens: Vec<usize> = prefix.iter().map(|&p| p + steps).collect();
    let c = case(
        "split G=4 mlp",
        cfg(4 * hkv, hkv, 8, 4, 16, 4, 24, PhiKind::Mlp),
        &lens,
        16,
        8,
        false,
        51,
    );
    let full = nsa::cpu::forward(&c.cfg, &c.x, &c.phi).unwrap();
    let (hq, hkv, dv, n) = (c.cfg.heads, c.cfg.kv_heads, c.x.dv, c.cfg.sel_count);
    let run = |threads: usize, split: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut cache = DecodeCache::<f32>::new(&c.cfg, prefix.len(), c.x.dk, dv).unwrap();
            for (b, &p) in prefix.iter().enumerate() {
                if p > 0 {
                    nsa::cpu::decode::prefill(&c.cfg, &mut cache, b, &slice(&c.x, b, 0, p), &c.phi)
                        .unwrap();
                }
            }
            (0..steps)
                .map(|k| {
                    let ts: Vec<usize> = prefix.iter().map(|&p| p + k).collect();
                    let xs = step_batch(&c.x, &ts);
                    nsa::cpu::decode::step_split(&c.cfg, &mut cache, &xs, &c.phi, split).unwrap()
                })
                .collect::<Vec<_>>()
        })
    };
    for split in [1usize, 3, 7] {
        let one = run(1, split);
        let three = run(3, split);
        for (k, (a, b)) in one.iter().zip(&three).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(
                bits(&a.o),
                bits(&b.o),
                "split {split} step {k}: 1 vs 3 threads"
            );
            assert_eq!(a.sel_idx, b.sel_idx);
            for (bb, &p) in prefix.iter().enumerate() {
                let i = c.x.cu_seqlens[bb] + p + k;
                let want: Vec<f64> = full.o[i * hq * dv..(i + 1) * hq * dv]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                assert_close(
                    &format!("split {split} step {k} seq {bb}"),
                    &a.o[bb * hq * dv..(bb + 1) * hq * dv],
                    &want,
                    1e-5,
                );
                assert_eq!(
                    &a.sel_idx[bb * hkv * n..(bb + 1) * hkv * n],
                    &full.sel_idx[i * hkv * n..(i + 1) * hkv * n],
                    "split {split} step {k} seq {bb}: sel_idx"
                );
            }
        }
    }
    let mut cache = DecodeCache::<f32>::new(&c.cfg, prefix.len(), c.x.dk, dv).unwrap();
    let xs = step_batch(&c.x, &vec![0; prefix.len()]);
    assert!(matches!(
        nsa::cpu::decode::step_split(&c.cfg, &mut cache, &xs, &c.phi, 0),
        Err(nsa::NsaError::Decode(_))
    ));
}
