//! The tensors of one NSA call, packed token-major (`[total_tokens, heads, dim]`) with
//! `cu_seqlens` marking where each sequence starts. A dense `[B, T, H, D]` batch is the same
//! memory with `cu_seqlens = [0, T, 2T, .., B*T]`.

use crate::config::{NsaConfig, PhiKind};
use crate::error::{NsaError, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Activations of one call. Every branch has its own K/V (pass copies of the same tensor to
/// share them). Element types: `f64` for the reference, `f32` for the fast paths.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaInputs<T> {
    /// Query/key head dimension.
    pub dk: usize,
    /// Value head dimension.
    pub dv: usize,
    /// Sequence boundaries: `cu_seqlens[b]..cu_seqlens[b+1]` are the tokens of sequence `b`.
    pub cu_seqlens: Vec<usize>,
    /// `[N, HQ, dk]`
    pub q: Vec<T>,
    /// `[N, HKV, dk]` keys of the compression branch (before `phi`).
    pub k_cmp: Vec<T>,
    /// `[N, HKV, dv]` values of the compression branch (before `phi`).
    pub v_cmp: Vec<T>,
    /// `[N, HKV, dk]`
    pub k_slc: Vec<T>,
    /// `[N, HKV, dv]`
    pub v_slc: Vec<T>,
    /// `[N, HKV, dk]`
    pub k_win: Vec<T>,
    /// `[N, HKV, dv]`
    pub v_win: Vec<T>,
    /// `[N, HQ]` gate of the compression branch (a value, already through the sigmoid).
    pub g_cmp: Vec<T>,
    /// `[N, HQ]`
    pub g_slc: Vec<T>,
    /// `[N, HQ]`
    pub g_win: Vec<T>,
}

/// Parameters of one `phi` (for K or for V), per KV head. `D` is `dk` for K and `dv` for V,
/// `l` the compression block length, `H` the MLP hidden size.
#[derive(Debug, Clone, PartialEq)]
pub enum PhiWeights<T> {
    /// No parameters.
    Mean,
    /// `out = flatten(x + pe) @ w`
    Linear {
        /// `[HKV, l, D]`
        pe: Vec<T>,
        /// `[HKV, l*D, D]`
        w: Vec<T>,
    },
    /// `out = silu(flatten(x + pe) @ w1 + b1) @ w2 + b2`
    Mlp {
        /// `[HKV, l, D]`
        pe: Vec<T>,
        /// `[HKV, l*D, H]`
        w1: Vec<T>,
        /// `[HKV, H]`
        b1: Vec<T>,
        /// `[HKV, H, D]`
        w2: Vec<T>,
        /// `[HKV, D]`
        b2: Vec<T>,
    },
}

/// The learned parameters of the compression branch: one `phi` for K, one for V.
#[derive(Debug, Clone, PartialEq)]
pub struct PhiParams<T> {
    /// Hidden width of the MLP (0 unless `Mlp`).
    pub hidden: usize,
    /// `phi` for the keys (`D = dk`).
    pub k: PhiWeights<T>,
    /// `phi` for the values (`D = dv`).
    pub v: PhiWeights<T>,
}

/// Result of a forward call.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaOutput<T> {
    /// `[N, HQ, dv]`
    pub o: Vec<T>,
    /// `[N, HKV, n]` selected block indices, ascending, padded with -1.
    pub sel_idx: Vec<i32>,
}

/// Gradients of a backward call, one per input (same shapes as the inputs).
#[derive(Debug, Clone, PartialEq)]
pub struct NsaGrads<T> {
    pub dq: Vec<T>,
    pub dk_cmp: Vec<T>,
    pub dv_cmp: Vec<T>,
    pub dk_slc: Vec<T>,
    pub dv_slc: Vec<T>,
    pub dk_win: Vec<T>,
    pub dv_win: Vec<T>,
    pub dg_cmp: Vec<T>,
    pub dg_slc: Vec<T>,
    pub dg_win: Vec<T>,
    /// Gradients of the `phi` parameters (`Mean` when there are none).
    pub dphi: PhiParams<T>,
}

fn check_len(name: &str, got: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if got != want {
        return Err(NsaError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: vec![got],
        });
    }
    Ok(())
}

/// Checks `cu_seqlens`: starts at 0, strictly increasing (no empty sequence), ends at `n`.
pub fn validate_cu_seqlens(cu: &[usize], n: usize) -> Result<()> {
    if cu.len() < 2 {
        return Err(NsaError::EmptySequence(
            "the batch holds no sequence (cu_seqlens needs at least 2 entries)".into(),
        ));
    }
    if cu[0] != 0 {
        return Err(NsaError::BadSeqLens(format!(
            "must start at 0, starts at {}",
            cu[0]
        )));
    }
    for (b, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(NsaError::BadSeqLens(format!("decreases at sequence {b}")));
        }
        if w[1] == w[0] {
            return Err(NsaError::EmptySequence(format!(
                "sequence {b} has no tokens"
            )));
        }
    }
    if *cu.last().unwrap() != n {
        return Err(NsaError::BadSeqLens(format!(
            "ends at {} but there are {n} tokens",
            cu.last().unwrap()
        )));
    }
    Ok(())
}

impl<T: Copy> NsaInputs<T> {
    /// Total number of tokens `N` (all sequences).
    pub fn num_tokens(&self) -> usize {
        *self.cu_seqlens.last().unwrap_or(&0)
    }

    /// Number of sequences `B`.
    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len().saturating_sub(1)
    }

    /// Token range of sequence `b`.
    pub fn seq_range(&self, b: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[b]..self.cu_seqlens[b + 1]
    }

    /// Checks the configuration, the head dims and every tensor's size against them.
    pub fn validate(&self, cfg: &NsaConfig) -> Result<()> {
        cfg.validate()?;
        cfg.validate_dims(self.dk, self.dv)?;
        let n = self.num_tokens();
        validate_cu_seqlens(&self.cu_seqlens, n)?;
        let (hq, hkv, dk, dv) = (cfg.heads, cfg.kv_heads, self.dk, self.dv);
        check_len("q", self.q.len(), &[n, hq, dk])?;
        for (name, t, d) in [
            ("k_cmp", &self.k_cmp, dk),
            ("v_cmp", &self.v_cmp, dv),
            ("k_slc", &self.k_slc, dk),
            ("v_slc", &self.v_slc, dv),
            ("k_win", &self.k_win, dk),
            ("v_win", &self.v_win, dv),
        ] {
            check_len(name, t.len(), &[n, hkv, d])?;
        }
        for (name, t) in [
            ("g_cmp", &self.g_cmp),
            ("g_slc", &self.g_slc),
            ("g_win", &self.g_win),
        ] {
            check_len(name, t.len(), &[n, hq])?;
        }
        Ok(())
    }

    /// Converts every element (e.g. `f32 -> f64` for the reference).
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> NsaInputs<U> {
        let m = |v: &Vec<T>| v.iter().map(|&x| f(x)).collect::<Vec<U>>();
        NsaInputs {
            dk: self.dk,
            dv: self.dv,
            cu_seqlens: self.cu_seqlens.clone(),
            q: m(&self.q),
            k_cmp: m(&self.k_cmp),
            v_cmp: m(&self.v_cmp),
            k_slc: m(&self.k_slc),
            v_slc: m(&self.v_slc),
            k_win: m(&self.k_win),
            v_win: m(&self.v_win),
            g_cmp: m(&self.g_cmp),
            g_slc: m(&self.g_slc),
            g_win: m(&self.g_win),
        }
    }

    /// The tokens of sequence `b` alone, as a one-sequence batch.
    pub fn sequence(&self, b: usize) -> NsaInputs<T> {
        let r = self.seq_range(b);
        let len = r.len();
        self.gather(&r.collect::<Vec<_>>(), vec![0, len])
    }

    /// A new batch made of the packed tokens `rows` (in that order) with boundaries
    /// `cu_seqlens` (which must end at `rows.len()`). Panics if a row is out of range.
    pub fn gather(&self, rows: &[usize], cu_seqlens: Vec<usize>) -> NsaInputs<T> {
        let n = self.num_tokens().max(1);
        let pick = |v: &Vec<T>| {
            let per = v.len() / n;
            let mut out = Vec::with_capacity(rows.len() * per);
            for &r in rows {
                out.extend_from_slice(&v[r * per..(r + 1) * per]);
            }
            out
        };
        NsaInputs {
            dk: self.dk,
            dv: self.dv,
            cu_seqlens,
            q: pick(&self.q),
            k_cmp: pick(&self.k_cmp),
            v_cmp: pick(&self.v_cmp),
            k_slc: pick(&self.k_slc),
            v_slc: pick(&self.v_slc),
            k_win: pick(&self.k_win),
            v_win: pick(&self.v_win),
            g_cmp: pick(&self.g_cmp),
            g_slc: pick(&self.g_slc),
            g_win: pick(&self.g_win),
        }
    }
}

impl NsaInputs<f32> {
    /// Random inputs for tests, demos and benchmarks: q, k, v ~ N(0, 1), gates ~ U(0, 1).
    /// With `shared_kv` the three branches get the same K/V.
    pub fn random(
        cfg: &NsaConfig,
        seqlens: &[usize],
        dk: usize,
        dv: usize,
        shared_kv: bool,
        seed: u64,
    ) -> NsaInputs<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cu = vec![0usize];
        for &l in seqlens {
            cu.push(cu.last().unwrap() + l);
        }
        let n = *cu.last().unwrap();
        let (hq, hkv) = (cfg.heads, cfg.kv_heads);
        let mut normal = |len: usize| -> Vec<f32> { (0..len).map(|_| gauss(&mut rng)).collect() };
        let q = normal(n * hq * dk);
        let k_cmp = normal(n * hkv * dk);
        let v_cmp = normal(n * hkv * dv);
        let (k_slc, v_slc, k_win, v_win) = if shared_kv {
            (k_cmp.clone(), v_cmp.clone(), k_cmp.clone(), v_cmp.clone())
        } else {
            (
                normal(n * hkv * dk),
                normal(n * hkv * dv),
                normal(n * hkv * dk),
                normal(n * hkv * dv),
            )
        };
        let mut uniform = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen::<f32>()).collect() };
        let g_cmp = uniform(n * hq);
        let g_slc = uniform(n * hq);
        let g_win = uniform(n * hq);
        NsaInputs {
            dk,
            dv,
            cu_seqlens: cu,
            q,
            k_cmp,
            v_cmp,
            k_slc,
            v_slc,
            k_win,
            v_win,
            g_cmp,
            g_slc,
            g_win,
        }
    }
}

/// One standard normal sample (Box-Muller).
fn gauss(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen::<f64>().max(1e-300);
    let u2: f64 = rng.gen::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

impl<T: Copy> PhiWeights<T> {
    /// Converts every element.
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> PhiWeights<U> {
        let m = |v: &Vec<T>| v.iter().map(|&x| f(x)).collect::<Vec<U>>();
        match self {
            PhiWeights::Mean => PhiWeights::Mean,
            PhiWeights::Linear { pe, w } => PhiWeights::Linear { pe: m(pe), w: m(w) },
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => PhiWeights::Mlp {
                pe: m(pe),
                w1: m(w1),
                b1: m(b1),
                w2: m(w2),
                b2: m(b2),
            },
        }
    }

    /// The kind of `phi` these weights belong to.
    pub fn kind(&self) -> PhiKind {
        match self {
            PhiWeights::Mean => PhiKind::Mean,
            PhiWeights::Linear { .. } => PhiKind::Linear,
            PhiWeights::Mlp { .. } => PhiKind::Mlp,
        }
    }

    /// Named tensors with their shapes, in a fixed order (for files and validation).
    /// `prefix` is e.g. `"phi_k"`; names are `phi_k.pe`, `phi_k.w`, `phi_k.w1`, ...
    pub fn named(&self, prefix: &str, shapes: PhiShapes) -> Vec<(String, Vec<usize>, &Vec<T>)> {
        let PhiShapes { hkv, l, d, hidden } = shapes;
        let name = |s: &str| format!("{prefix}.{s}");
        match self {
            PhiWeights::Mean => vec![],
            PhiWeights::Linear { pe, w } => vec![
                (name("pe"), vec![hkv, l, d], pe),
                (name("w"), vec![hkv, l * d, d], w),
            ],
            PhiWeights::Mlp { pe, w1, b1, w2, b2 } => vec![
                (name("pe"), vec![hkv, l, d], pe),
                (name("w1"), vec![hkv, l * d, hidden], w1),
                (name("b1"), vec![hkv, hidden], b1),
                (name("w2"), vec![hkv, hidden, d], w2),
                (name("b2"), vec![hkv, d], b2),
            ],
        }
    }
}

/// Sizes that fix the shapes of one `phi`'s tensors.
#[derive(Debug, Clone, Copy)]
pub struct PhiShapes {
    pub hkv: usize,
    pub l: usize,
    pub d: usize,
    pub hidden: usize,
}

impl<T: Copy> PhiParams<T> {
    /// `Mean` for K and V: no parameters.
    pub fn mean() -> Self {
        PhiParams {
            hidden: 0,
            k: PhiWeights::Mean,
            v: PhiWeights::Mean,
        }
    }

    /// Converts every element.
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> PhiParams<U> {
        PhiParams {
            hidden: self.hidden,
            k: self.k.map(f),
            v: self.v.map(f),
        }
    }

    /// Checks that the weights match the configuration's `phi` kind and the shapes.
    pub fn validate(&self, cfg: &NsaConfig, dk: usize, dv: usize) -> Result<()> {
        for (which, w) in [("phi_k", &self.k), ("phi_v", &self.v)] {
            if w.kind() != cfg.phi {
                return Err(NsaError::Unsupported(format!(
                    "{which} holds {:?} weights but the config asks for {:?}",
                    w.kind(),
                    cfg.phi
                )));
            }
        }
        if cfg.phi == PhiKind::Mlp && self.hidden == 0 {
            return Err(NsaError::ZeroSize("phi hidden size"));
        }
        for (name, shape, t) in self.named_tensors(cfg, dk, dv) {
            check_len(&name, t.len(), &shape)?;
        }
        Ok(())
    }

    /// All parameter tensors with names (`phi_k.*`, `phi_v.*`) and shapes.
    pub fn named_tensors(
        &self,
        cfg: &NsaConfig,
        dk: usize,
        dv: usize,
    ) -> Vec<(String, Vec<usize>, &Vec<T>)> {
        let shapes = |d| PhiShapes {
            hkv: cfg.kv_heads,
            l: cfg.cmp_block,
            d,
            hidden: self.hidden,
        };
        let mut out = self.k.named("phi_k", shapes(dk));
        out.extend(self.v.named("phi_v", shapes(dv)));
        out
    }
}

impl PhiParams<f32> {
    /// Random parameters of the configured kind, scaled so that `phi` of unit-variance
    /// tokens has roughly unit variance. `hidden` is used by `Mlp` only.
    pub fn random(cfg: &NsaConfig, dk: usize, dv: usize, hidden: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let (hkv, l) = (cfg.kv_heads, cfg.cmp_block);
        let mut unif = |len: usize, a: f32| -> Vec<f32> {
            (0..len)
                .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * a)
                .collect()
        };
        let mut make = |d: usize| -> PhiWeights<f32> {
            let fan_in = (l * d) as f32;
            match cfg.phi {
                PhiKind::Mean => PhiWeights::Mean,
                PhiKind::Linear => PhiWeights::Linear {
                    pe: unif(hkv * l * d, 0.1),
                    w: unif(hkv * l * d * d, (3.0 / fan_in).sqrt()),
                },
                PhiKind::Mlp => PhiWeights::Mlp {
                    pe: unif(hkv * l * d, 0.1),
                    w1: unif(hkv * l * d * hidden, (3.0 / fan_in).sqrt()),
                    b1: unif(hkv * hidden, 0.1),
                    w2: unif(hkv * hidden * d, (3.0 / hidden.max(1) as f32).sqrt()),
                    b2: unif(hkv * d, 0.1),
                },
            }
        };
        let k = make(dk);
        let v = make(dv);
        PhiParams {
            hidden: if cfg.phi == PhiKind::Mlp { hidden } else { 0 },
            k,
            v,
        }
    }
}

impl<T: Copy> NsaOutput<T> {
    /// Converts every element of `o`.
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> NsaOutput<U> {
        NsaOutput {
            o: self.o.iter().map(|&x| f(x)).collect(),
            sel_idx: self.sel_idx.clone(),
        }
    }
}

impl<T: Copy> NsaGrads<T> {
    /// Converts every element.
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> NsaGrads<U> {
        let m = |v: &Vec<T>| v.iter().map(|&x| f(x)).collect::<Vec<U>>();
        NsaGrads {
            dq: m(&self.dq),
            dk_cmp: m(&self.dk_cmp),
            dv_cmp: m(&self.dv_cmp),
            dk_slc: m(&self.dk_slc),
            dv_slc: m(&self.dv_slc),
            dk_win: m(&self.dk_win),
            dv_win: m(&self.dv_win),
            dg_cmp: m(&self.dg_cmp),
            dg_slc: m(&self.dg_slc),
            dg_win: m(&self.dg_win),
            dphi: self.dphi.map(f),
        }
    }

    /// The gradients with their names (`dq`, `dk_cmp`, ..., `dg_win`), phi gradients excluded.
    pub fn named(&self) -> [(&'static str, &Vec<T>); 10] {
        [
            ("dq", &self.dq),
            ("dk_cmp", &self.dk_cmp),
            ("dv_cmp", &self.dv_cmp),
            ("dk_slc", &self.dk_slc),
            ("dv_slc", &self.dv_slc),
            ("dk_win", &self.dk_win),
            ("dv_win", &self.dv_win),
            ("dg_cmp", &self.dg_cmp),
            ("dg_slc", &self.dg_slc),
            ("dg_win", &self.dg_win),
        ]
    }
}
