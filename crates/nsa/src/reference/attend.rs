//! Softmax attention of one query row over an explicit list of key positions, forward (with
//! the log-sum-exp and the probabilities) and backward. Every branch of NSA is this function
//! with a different key list; positions not in the list are excluded outright (no finite mask).
//!
//! Forward:  `s_j = scale * q . k_j`,  `p = softmax(s)`,  `o = sum_j p_j v_j`,  `lse = log sum_j exp(s_j)`.
//! Backward (upstream `do`): `dv_j += p_j do`,  `dp_j = do . v_j`,  `ds_j = p_j (dp_j - do . o)`,
//! `dq += scale sum_j ds_j k_j`,  `dk_j += scale ds_j q`.
//! An empty key list gives `o = 0`, `lse = -inf`, and no gradient at all.

/// The keys and values of one KV head `h`, stored `[rows, HKV, D]` (token-major, as in
/// `NsaInputs` and the compressed K/V): row `s` of head `h` is `k[(s*HKV + h)*dk ..][..dk]`.
#[derive(Debug, Clone, Copy)]
pub struct HeadKv<'a> {
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub hkv: usize,
    pub h: usize,
    pub dk: usize,
    pub dv: usize,
}

impl<'a> HeadKv<'a> {
    /// Offset of row `s` in a `[rows, HKV, dim]` tensor.
    pub fn offset(&self, s: usize, dim: usize) -> usize {
        (s * self.hkv + self.h) * dim
    }

    pub fn key(&self, s: usize) -> &'a [f64] {
        let o = self.offset(s, self.dk);
        &self.k[o..o + self.dk]
    }

    pub fn value(&self, s: usize) -> &'a [f64] {
        let o = self.offset(s, self.dv);
        &self.v[o..o + self.dv]
    }
}

/// Result of [`attend`].
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `[dv]`
    pub o: Vec<f64>,
    /// `log sum_j exp(s_j)`; `-inf` for an empty key list.
    pub lse: f64,
    /// Softmax probabilities, one per entry of the key list, in its order.
    pub p: Vec<f64>,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Attention of `q` (`[dk]`) over the rows `keys` of `kv`.
pub fn attend(q: &[f64], scale: f64, kv: &HeadKv<'_>, keys: &[usize]) -> Attention {
    let mut o = vec![0.0; kv.dv];
    if keys.is_empty() {
        return Attention {
            o,
            lse: f64::NEG_INFINITY,
            p: Vec::new(),
        };
    }
    let s: Vec<f64> = keys.iter().map(|&j| scale * dot(q, kv.key(j))).collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
    for (&j, &pj) in keys.iter().zip(&p) {
        for (oc, vc) in o.iter_mut().zip(kv.value(j)) {
            *oc += pj * vc;
        }
    }
    Attention {
        o,
        lse: m + z.ln(),
        p,
    }
}

/// Gradient buffers shaped like the `k` and `v` of a [`HeadKv`] (`[rows, HKV, D]`).
pub struct HeadKvGrad<'a> {
    pub dk: &'a mut [f64],
    pub dv: &'a mut [f64],
}

/// Backward of [`attend`]: given the forward result `att` and the upstream gradient `d_o`
/// (`[dv]`), **adds** to `dq` (`[dk]`) and to the rows `keys` of `grad`.
pub fn attend_backward(
    q: &[f64],
    scale: f64,
    kv: &HeadKv<'_>,
    keys: &[usize],
    att: &Attention,
    d_o: &[f64],
    dq: &mut [f64],
    grad: &mut HeadKvGrad<'_>,
) {
    if keys.is_empty() {
        return;
    }
    let delta = dot(d_o, &att.o);
    for (&j, &pj) in keys.iter().zip(&att.p) {
        let ov = kv.offset(j, kv.dv);
        for c in 0..kv.dv {
            grad.dv[ov + c] += pj * d_o[c];
        }
        let ds = pj * (dot(d_o, kv.value(j)) - delta);
        let k = kv.key(j);
        let ok = kv.offset(j, kv.dk);
        for c in 0..kv.dk {
            dq[c] += scale * ds * k[c];
            grad.dk[ok + c] += scale * ds * q[c];
        }
    }
}
