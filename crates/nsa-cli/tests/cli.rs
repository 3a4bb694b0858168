//! End-to-end tests of the `nsa` binary: file conventions, backends agreeing, decode replay,
//! and bad input giving one clear line on stderr with a non-zero exit (never a panic).

use nsa::{NsaConfig, NsaInputs, PhiKind, PhiParams};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_nsa");

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn small_cfg(phi: PhiKind) -> NsaConfig {
    NsaConfig::builder()
        .heads(4)
        .kv_heads(2)
        .cmp_block(8)
        .cmp_stride(4)
        .sel_block(16)
        .sel_count(3)
        .window(12)
        .phi(phi)
        .build()
        .unwrap()
}

enum Data<'a> {
    F32(&'a [f32]),
    Bf16(&'a [f32]),
    I32(&'a [i32]),
}

fn save(path: &Path, tensors: Vec<(String, Vec<usize>, Data<'_>)>) {
    let bufs: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, d)| match d {
            Data::F32(v) => (
                n,
                s,
                Dtype::F32,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            Data::Bf16(v) => (
                n,
                s,
                Dtype::BF16,
                v.iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            ),
            Data::I32(v) => (
                n,
                s,
                Dtype::I32,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, s, dt, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn read_i32(path: &Path, name: &str) -> (Vec<usize>, Vec<i32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I32, "{name}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

/// Writes config + a dense `[B, T, ..]` problem (per-branch K/V, phi params, `do`).
fn write_problem(
    c: &Case,
    cfg: &NsaConfig,
    b: usize,
    t: usize,
    dk: usize,
    dv: usize,
    seed: u64,
) -> (NsaInputs<f32>, PhiParams<f32>, Vec<f32>) {
    std::fs::write(c.path("cfg.json"), serde_json::to_string(cfg).unwrap()).unwrap();
    let x = NsaInputs::random(cfg, &vec![t; b], dk, dv, false, seed);
    let phi = PhiParams::random(cfg, dk, dv, 6, seed);
    let d_o = NsaInputs::random(cfg, &[b * t], dv, dv, true, seed ^ 7).q;
    let (hq, hkv) = (cfg.heads, cfg.kv_heads);
    let mut ts = vec![
        ("q".to_string(), vec![b, t, hq, dk], Data::F32(&x.q)),
        ("k_cmp".into(), vec![b, t, hkv, dk], Data::F32(&x.k_cmp)),
        ("v_cmp".into(), vec![b, t, hkv, dv], Data::F32(&x.v_cmp)),
        ("k_slc".into(), vec![b, t, hkv, dk], Data::F32(&x.k_slc)),
        ("v_slc".into(), vec![b, t, hkv, dv], Data::F32(&x.v_slc)),
        ("k_win".into(), vec![b, t, hkv, dk], Data::F32(&x.k_win)),
        ("v_win".into(), vec![b, t, hkv, dv], Data::F32(&x.v_win)),
        ("g_cmp".into(), vec![b, t, hq], Data::F32(&x.g_cmp)),
        ("g_slc".into(), vec![b, t, hq], Data::F32(&x.g_slc)),
        ("g_win".into(), vec![b, t, hq], Data::F32(&x.g_win)),
        ("do".into(), vec![b, t, hq, dv], Data::F32(&d_o)),
    ];
    for (name, shape, v) in phi.named_tensors(cfg, dk, dv) {
        ts.push((name, shape, Data::F32(v)));
    }
    save(&c.path("in.safetensors"), ts);
    (x, phi, d_o)
}

fn nsa(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run nsa")
}

fn run_ok(args: &[&str]) {
    let out = nsa(args);
    assert!(
        out.status.success(),
        "nsa {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command that must fail: exit code 1, exactly one line on stderr containing `needle`,
/// and no panic message.
fn run_err(args: &[&str], needle: &str) {
    let out = nsa(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "nsa {args:?}: stderr {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.starts_with("nsa: error: "), "{err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn io_args<'a>(c: &'a Case, out: &'a str) -> Vec<String> {
    vec![
        "--config".into(),
        c.path("cfg.json").display().to_string(),
        "--input".into(),
        c.path("in.safetensors").display().to_string(),
        "--output".into(),
        c.path(out).display().to_string(),
    ]
}

fn with(mut base: Vec<String>, more: &[&str]) -> Vec<String> {
    base.extend(more.iter().map(|s| s.to_string()));
    base
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[test]
fn forward_cpu_matches_reference_and_library() {
    for phi_kind in [PhiKind::Mean, PhiKind::Mlp] {
        let c = Case::new();
        let cfg = small_cfg(phi_kind);
        let (x, phi, _) = write_problem(&c, &cfg, 2, 37, 8, 6, 11);
        run_ok(&strs(&with(
            vec!["forward".into()],
            &strs(&io_args(&c, "fast.st")),
        )));
        run_ok(&strs(&with(
            with(vec!["forward".into()], &strs(&io_args(&c, "ref.st"))),
            &["--reference"],
        )));
        let (shape, fast) = read_f32(&c.path("fast.st"), "o");
        assert_eq!(shape, vec![2, 37, 4, 6]);
        let (_, refo) = read_f32(&c.path("ref.st"), "o");
        assert!(nsa::testing::rel_rms(&fast, &refo) < 1e-5);
        let (ishape, idx) = read_i32(&c.path("fast.st"), "sel_idx");
        assert_eq!(ishape, vec![2, 37, 2, 3]);
        let lib = nsa::reference_forward(&cfg, &x, &phi).unwrap();
        assert!(nsa::testing::rel_rms(&refo, &lib.o) < 1e-7);
        let (scores, mb) =
            nsa::reference::selection_scores(&cfg, &x.map(f64::from), &phi.map(f64::from)).unwrap();
        nsa::testing::check_selection_tie_aware(
            &cfg,
            &x.cu_seqlens,
            &lib.sel_idx,
            &idx,
            &scores,
            mb,
        )
        .unwrap();
    }
}

#[test]
fn decode_from_matches_forward() {
    let c = Case::new();
    let cfg = small_cfg(PhiKind::Linear);
    write_problem(&c, &cfg, 2, 41, 8, 8, 5);
    run_ok(&strs(&with(
        vec!["forward".into()],
        &strs(&io_args(&c, "fwd.st")),
    )));
    for p in ["0", "9", "30"] {
        for extra in [&[][..], &["--reference"][..]] {
            let args = with(
                with(vec!["forward".into()], &strs(&io_args(&c, "dec.st"))),
                &["--decode-from", p],
            );
            run_ok(&strs(&with(args, extra)));
            let (_, a) = read_f32(&c.path("fwd.st"), "o");
            let (_, b) = read_f32(&c.path("dec.st"), "o");
            assert!(nsa::testing::rel_rms(&b, &a) < 1e-5, "P={p} {extra:?}");
        }
    }
}

#[test]
fn backward_writes_every_gradient_and_matches_reference() {
    let c = Case::new();
    let cfg = small_cfg(PhiKind::Mlp);
    write_problem(&c, &cfg, 1, 29, 8, 4, 3);
    run_ok(&strs(&with(
        vec!["backward".into()],
        &strs(&io_args(&c, "g.st")),
    )));
    run_ok(&strs(&with(
        with(vec!["backward".into()], &strs(&io_args(&c, "gr.st"))),
        &["--reference"],
    )));
    let names = [
        ("dq", vec![1, 29, 4, 8]),
        ("dk_cmp", vec![1, 29, 2, 8]),
        ("dv_cmp", vec![1, 29, 2, 4]),
        ("dk_slc", vec![1, 29, 2, 8]),
        ("dv_slc", vec![1, 29, 2, 4]),
        ("dk_win", vec![1, 29, 2, 8]),
        ("dv_win", vec![1, 29, 2, 4]),
        ("dg_cmp", vec![1, 29, 4]),
        ("dg_slc", vec![1, 29, 4]),
        ("dg_win", vec![1, 29, 4]),
        ("dphi_k.w1", vec![2, 8 * 8, 6]),
        ("dphi_v.w2", vec![2, 6, 4]),
    ];
    for (name, shape) in names {
        let (s, g) = read_f32(&c.path("g.st"), name);
        assert_eq!(s, shape, "{name}");
        let (_, r) = read_f32(&c.path("gr.st"), name);
        assert!(nsa::testing::rel_rms(&g, &r) < 1e-5, "{name}");
    }
}

#[test]
fn shared_kv_bf16_and_packed_varlen() {
    let c = Case::new();
    let cfg = small_cfg(PhiKind::Mean);
    std::fs::write(c.path("cfg.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let lens = [13usize, 30];
    let x = NsaInputs::random(&cfg, &lens, 8, 8, true, 9);
    // round to bf16 so that the library sees exactly what the file holds
    let x = x.map(|v| half::bf16::from_f32(v).to_f32());
    let n = x.num_tokens();
    let cu: Vec<i32> = x.cu_seqlens.iter().map(|&v| v as i32).collect();
    save(
        &c.path("in.safetensors"),
        vec![
            ("q".into(), vec![n, 4, 8], Data::Bf16(&x.q)),
            ("k".into(), vec![n, 2, 8], Data::Bf16(&x.k_cmp)),
            ("v".into(), vec![n, 2, 8], Data::Bf16(&x.v_cmp)),
            ("g_cmp".into(), vec![n, 4], Data::Bf16(&x.g_cmp)),
            ("g_slc".into(), vec![n, 4], Data::Bf16(&x.g_slc)),
            ("g_win".into(), vec![n, 4], Data::Bf16(&x.g_win)),
            ("cu_seqlens".into(), vec![3], Data::I32(&cu)),
        ],
    );
    run_ok(&strs(&with(
        vec!["forward".into()],
        &strs(&io_args(&c, "o.st")),
    )));
    let (shape, o) = read_f32(&c.path("o.st"), "o");
    assert_eq!(shape, vec![n, 4, 8]);
    let want = nsa::reference_forward(&cfg, &x, &PhiParams::mean()).unwrap();
    assert!(nsa::testing::rel_rms(&o, &want.o) < 1e-5);
}

#[test]
fn bad_input_is_one_line_and_nonzero_exit() {
    let c = Case::new();
    let cfg = small_cfg(PhiKind::Mean);
    write_problem(&c, &cfg, 1, 20, 8, 8, 1);
    let base = io_args(&c, "o.st");
    // config that breaks the SPEC
    let mut bad = serde_json::to_value(&cfg).unwrap();
    bad["kv_heads"] = 3.into();
    std::fs::write(c.path("bad.json"), bad.to_string()).unwrap();
    let mut a = base.clone();
    a[1] = c.path("bad.json").display().to_string();
    run_err(
        &strs(&with(vec!["forward".into()], &strs(&a))),
        "multiple of kv heads",
    );
    // unknown key in the config
    std::fs::write(
        c.path("typo.json"),
        r#"{"heads":4,"kv_heads":2,"cmp_blok":8}"#,
    )
    .unwrap();
    a[1] = c.path("typo.json").display().to_string();
    run_err(
        &strs(&with(vec!["forward".into()], &strs(&a))),
        "unknown field",
    );
    // missing config file
    a[1] = c.path("nope.json").display().to_string();
    run_err(
        &strs(&with(vec!["forward".into()], &strs(&a))),
        "cannot read",
    );
    // missing tensor: backward needs `do`; drop it by writing a file without it
    save(
        &c.path("nodo.safetensors"),
        vec![("q".into(), vec![1, 20, 4, 8], Data::F32(&[0.5; 640]))],
    );
    let mut a = base.clone();
    a[3] = c.path("nodo.safetensors").display().to_string();
    run_err(
        &strs(&with(vec!["forward".into()], &strs(&a))),
        "missing tensor",
    );
    // wrong shape: q with the wrong head count
    save(
        &c.path("shape.safetensors"),
        vec![("q".into(), vec![1, 20, 3, 8], Data::F32(&[0.5; 480]))],
    );
    a[3] = c.path("shape.safetensors").display().to_string();
    run_err(
        &strs(&with(vec!["forward".into()], &strs(&a))),
        "tensor `q`",
    );
    // not a safetensors file
    std::fs::write(c.path("junk.safetensors"), b"not a tensor file").unwrap();
    a[3] = c.path("junk.safetensors").display().to_string();
    run_err(&strs(&with(vec!["forward".into()], &strs(&a))), "format");
    // cuda device without the feature (or without a GPU) is a typed error, not a crash
    if !cfg!(feature = "cuda") {
        run_err(
            &strs(&with(
                vec!["backward".into()],
                &strs(&with(base.clone(), &["--device", "cuda"])),
            )),
            "CUDA",
        );
    }
    // a bad flag value is a usage error (clap's exit code 2), also without a panic
    let out = nsa(&strs(&with(
        vec!["forward".into()],
        &strs(&with(base, &["--device", "tpu"])),
    )));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("device `tpu`") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn demo_quick_passes_its_checks() {
    let out = nsa(&["demo", "--quick"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("all correctness checks passed"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    for op in ["forward", "forward+backward", "decode step"] {
        assert!(text.contains(op), "missing `{op}` row: {text}");
    }
}
