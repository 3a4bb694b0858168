//! The dense causal baseline against a plain float64 implementation written here (forward,
//! backward) and its decode step against the forward's last rows.

mod cpu_common;
use cpu_common::{assert_close, random_grad};
use nsa::cpu::dense::{self, DenseShape};

/// Plain f64 causal GQA attention: `o`, and the gradients for `d_o`.
#[allow(clippy::type_complexity)]
fn naive(
    sh: &DenseShape,
    cu: &[usize],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (hq, hkv, dk, dv) = (sh.heads, sh.kv_heads, sh.dk, sh.dv);
    let g = hq / hkv;
    let scale = 1.0 / (dk as f64).sqrt();
    let n = *cu.last().unwrap();
    let (mut o, mut dq, mut dkk, mut dvv) = (
        vec![0.0; n * hq * dv],
        vec![0.0; q.len()],
        vec![0.0; k.len()],
        vec![0.0; v.len()],
    );
    for w in cu.windows(2) {
        for i in w[0]..w[1] {
            for h in 0..hq {
                let kh = h / g;
                let qi = &q[(i * hq + h) * dk..][..dk];
                let keys: Vec<usize> = (w[0]..=i).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        scale
                            * (0..dk)
                                .map(|e| qi[e] * k[(j * hkv + kh) * dk + e])
                                .sum::<f64>()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                let oi = &mut o[(i * hq + h) * dv..][..dv];
                for (pj, &j) in p.iter().zip(&keys) {
                    for e in 0..dv {
                        oi[e] += pj * v[(j * hkv + kh) * dv + e];
                    }
                }
                let doi = &d_o[(i * hq + h) * dv..][..dv];
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| (0..dv).map(|e| doi[e] * v[(j * hkv + kh) * dv + e]).sum())
                    .collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for ((pj, dpj), &j) in p.iter().zip(&dp).zip(&keys) {
                    let ds = pj * (dpj - delta) * scale;
                    for e in 0..dk {
                        dq[(i * hq + h) * dk + e] += ds * k[(j * hkv + kh) * dk + e];
                        dkk[(j * hkv + kh) * dk + e] += ds * qi[e];
                    }
                    for e in 0..dv {
                        dvv[(j * hkv + kh) * dv + e] += pj * doi[e];
                    }
                }
            }
        }
    }
    (o, dq, dkk, dvv)
}

#[test]
fn dense_forward_backward_decode_match_naive() {
    for (hq, hkv, dk, dv, lens) in [
        (4usize, 2usize, 16usize, 8usize, vec![300usize, 5, 1]),
        (16, 1, 8, 8, vec![70]),
        (2, 2, 8, 12, vec![33, 260]),
    ] {
        let sh = DenseShape {
            heads: hq,
            kv_heads: hkv,
            dk,
            dv,
            scale: None,
        };
        let mut cu = vec![0usize];
        for l in &lens {
            cu.push(cu.last().unwrap() + l);
        }
        let n = *cu.last().unwrap();
        let q = random_grad(n * hq * dk, 1);
        let k = random_grad(n * hkv * dk, 2);
        let v = random_grad(n * hkv * dv, 3);
        let d_o = random_grad(n * hq * dv, 4);
        let f = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (o, dq, dkk, dvv) = naive(&sh, &cu, &f(&q), &f(&k), &f(&v), &f(&d_o));
        let (go, lse) = dense::forward(&sh, &cu, &q, &k, &v).unwrap();
        assert_close("dense o", &go, &o, 1e-5);
        let (gq, gk, gv) = dense::backward(&sh, &cu, &q, &k, &v, &go, &lse, &d_o).unwrap();
        assert_close("dense dq", &gq, &dq, 1e-5);
        assert_close("dense dk", &gk, &dkk, 1e-5);
        assert_close("dense dv", &gv, &dvv, 1e-5);
        // Decode: the last token of each sequence against its whole prefix.
        let (rk, rv) = (hkv * dk, hkv * dv);
        let kc: Vec<&[f32]> = cu.windows(2).map(|w| &k[w[0] * rk..w[1] * rk]).collect();
        let vc: Vec<&[f32]> = cu.windows(2).map(|w| &v[w[0] * rv..w[1] * rv]).collect();
        let qd: Vec<f32> = cu
            .windows(2)
            .flat_map(|w| q[(w[1] - 1) * hq * dk..w[1] * hq * dk].to_vec())
            .collect();
        let od = dense::decode_step(&sh, &qd, &kc, &vc).unwrap();
        let want: Vec<f64> = cu
            .windows(2)
            .flat_map(|w| o[(w[1] - 1) * hq * dv..w[1] * hq * dv].to_vec())
            .collect();
        assert_close("dense decode", &od, &want, 1e-5);
    }
}

#[test]
fn dense_rejects_bad_shapes() {
    let sh = DenseShape {
        heads: 3,
        kv_heads: 2,
        dk: 4,
        dv: 4,
        scale: None,
    };
    assert!(dense::forward(&sh, &[0, 2], &[0.0; 24], &[0.0; 16], &[0.0; 16]).is_err());
    let sh = DenseShape {
        heads: 2,
        kv_heads: 1,
        dk: 4,
        dv: 4,
        scale: None,
    };
    assert!(matches!(
        dense::forward(&sh, &[0, 2], &[0.0; 15], &[0.0; 8], &[0.0; 8]),
        Err(nsa::NsaError::ShapeMismatch { .. })
    ));
}
