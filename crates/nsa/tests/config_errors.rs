//! Every error path of configuration and input validation, through the builder, JSON, and
//! the reference entry points (forward, backward, selection scores, decoding): bad input is a
//! typed `NsaError`, never a panic.

mod reference_util;

use nsa::cache::DecodeCache;
use nsa::reference::{backward, decode, forward, selection_scores};
use nsa::{NsaConfig, NsaError, NsaInputs, PhiKind, PhiParams, PhiWeights};
use reference_util::*;

fn base() -> NsaConfig {
    small_cfg(4, 2, PhiKind::Mean)
}

/// The error of forward, backward (with a well-sized `d_o` when possible) and
/// selection_scores; asserts that all three agree and returns it.
fn op_error(cfg: &NsaConfig, x: &NsaInputs<f64>, phi: &PhiParams<f64>) -> NsaError {
    let e1 = forward(cfg, x, phi).unwrap_err();
    let d_o = vec![0.5; x.num_tokens() * cfg.heads.max(1) * x.dv];
    let e2 = backward(cfg, x, phi, &d_o).unwrap_err();
    let e3 = selection_scores(cfg, x, phi).unwrap_err();
    assert_eq!(e1, e2, "forward and backward disagree");
    assert_eq!(e1, e3, "forward and selection_scores disagree");
    e1
}

fn good() -> (NsaConfig, NsaInputs<f64>, PhiParams<f64>) {
    let cfg = base();
    let x = inputs(&cfg, &[9, 5], 3, 2, 1);
    (cfg, x, PhiParams::mean())
}

#[test]
fn the_good_case_is_accepted() {
    let (cfg, x, phi) = good();
    forward(&cfg, &x, &phi).unwrap();
    backward(&cfg, &x, &phi, &vec![0.5; 14 * 4 * 2]).unwrap();
    selection_scores(&cfg, &x, &phi).unwrap();
}

#[test]
fn zero_sizes() {
    let (_, x, phi) = good();
    type Set = fn(&mut NsaConfig);
    let cases: [(&str, Set); 7] = [
        ("heads", |c| c.heads = 0),
        ("kv_heads", |c| c.kv_heads = 0),
        ("cmp_block", |c| c.cmp_block = 0),
        ("cmp_stride", |c| c.cmp_stride = 0),
        ("sel_block", |c| c.sel_block = 0),
        ("sel_count", |c| c.sel_count = 0),
        ("window", |c| c.window = 0),
    ];
    for (name, set) in cases {
        let mut cfg = base();
        set(&mut cfg);
        assert_eq!(cfg.validate(), Err(NsaError::ZeroSize(name)));
        assert_eq!(op_error(&cfg, &x, &phi), NsaError::ZeroSize(name));
    }
    let mut b = NsaConfig::builder();
    b = b.window(0);
    assert_eq!(b.build(), Err(NsaError::ZeroSize("window")));

    // Head dims of the tensors.
    let cfg = base();
    let x0 = inputs(&cfg, &[5], 0, 2, 2);
    assert_eq!(op_error(&cfg, &x0, &phi), NsaError::ZeroSize("dk"));
    let x0 = inputs(&cfg, &[5], 3, 0, 2);
    assert_eq!(forward(&cfg, &x0, &phi), Err(NsaError::ZeroSize("dv")));
    assert_eq!(
        selection_scores(&cfg, &x0, &phi),
        Err(NsaError::ZeroSize("dv"))
    );
}

#[test]
fn heads_not_divisible() {
    let (_, x, phi) = good();
    let cfg = NsaConfig { heads: 5, ..base() };
    let want = NsaError::HeadsNotDivisible {
        heads: 5,
        kv_heads: 2,
    };
    assert_eq!(op_error(&cfg, &x, &phi), want);
    assert_eq!(
        NsaConfig::builder().heads(6).kv_heads(4).build(),
        Err(NsaError::HeadsNotDivisible {
            heads: 6,
            kv_heads: 4
        })
    );
}

#[test]
fn stride_must_divide_both_blocks() {
    let (_, x, phi) = good();
    let cfg = NsaConfig {
        cmp_block: 6,
        cmp_stride: 4,
        ..base()
    };
    assert_eq!(
        op_error(&cfg, &x, &phi),
        NsaError::StrideNotDividing {
            what: "cmp_block",
            block: 6,
            stride: 4
        }
    );
    let cfg = NsaConfig {
        sel_block: 9,
        ..base()
    };
    assert_eq!(
        op_error(&cfg, &x, &phi),
        NsaError::StrideNotDividing {
            what: "sel_block",
            block: 9,
            stride: 2
        }
    );
}

#[test]
fn cmp_block_larger_than_sel_block() {
    let (_, x, phi) = good();
    let cfg = NsaConfig {
        cmp_block: 16,
        ..base()
    };
    assert_eq!(
        op_error(&cfg, &x, &phi),
        NsaError::CmpBlockTooLarge {
            cmp_block: 16,
            sel_block: 8
        }
    );
}

#[test]
fn fewer_selected_than_forced() {
    let (_, x, phi) = good();
    let cfg = NsaConfig {
        sel_count: 1,
        ..base()
    };
    assert_eq!(
        op_error(&cfg, &x, &phi),
        NsaError::TooFewSelected {
            sel_count: 1,
            init: 1,
            local: 1
        }
    );
    // n equal to the forced count is fine.
    let cfg = NsaConfig {
        sel_count: 2,
        ..base()
    };
    forward(&cfg, &x, &phi).unwrap();
}

#[test]
fn bad_scale() {
    let (_, x, phi) = good();
    for s in [0.0, -1.0, f64::INFINITY, f64::NEG_INFINITY] {
        let cfg = NsaConfig {
            scale: Some(s),
            ..base()
        };
        assert_eq!(op_error(&cfg, &x, &phi), NsaError::BadScale(s));
    }
    let cfg = NsaConfig {
        scale: Some(f64::NAN),
        ..base()
    };
    assert!(matches!(forward(&cfg, &x, &phi), Err(NsaError::BadScale(s)) if s.is_nan()));
}

#[test]
fn json_errors() {
    let bad_field = r#"{"heads":4,"kv_heads":2,"cmp_block":4,"cmp_stride":2,"sel_block":8,
        "sel_count":3,"init_blocks":1,"local_blocks":1,"window":5,"typo":1}"#;
    assert!(matches!(
        NsaConfig::from_json(bad_field),
        Err(NsaError::Format(_))
    ));
    let zero = r#"{"heads":0,"kv_heads":2,"cmp_block":4,"cmp_stride":2,"sel_block":8,
        "sel_count":3,"init_blocks":1,"local_blocks":1,"window":5}"#;
    assert_eq!(NsaConfig::from_json(zero), Err(NsaError::ZeroSize("heads")));
}

#[test]
fn every_input_tensor_shape_is_checked() {
    let (cfg, x, phi) = good();
    let names = [
        "q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g_cmp", "g_slc", "g_win",
    ];
    for (which, name) in names.iter().enumerate() {
        let mut y = x.clone();
        let t = match which {
            0 => &mut y.q,
            1 => &mut y.k_cmp,
            2 => &mut y.v_cmp,
            3 => &mut y.k_slc,
            4 => &mut y.v_slc,
            5 => &mut y.k_win,
            6 => &mut y.v_win,
            7 => &mut y.g_cmp,
            8 => &mut y.g_slc,
            _ => &mut y.g_win,
        };
        t.pop();
        match op_error(&cfg, &y, &phi) {
            NsaError::ShapeMismatch { name: got, .. } => assert_eq!(&got, name),
            e => panic!("{name}: unexpected {e:?}"),
        }
    }
}

#[test]
fn d_o_shape_is_checked() {
    let (cfg, x, phi) = good();
    let e = backward(&cfg, &x, &phi, &vec![0.5; 14 * 4 * 2 - 1]).unwrap_err();
    assert!(
        matches!(e, NsaError::ShapeMismatch { ref name, .. } if name == "d_o"),
        "{e:?}"
    );
}

#[test]
fn bad_cu_seqlens() {
    let (cfg, x, phi) = good(); // 14 tokens
    #[derive(Debug)]
    enum Want {
        BadSeqLens,
        Empty,
        Shape,
    }
    for (cu, want) in [
        (vec![1, 9, 14], Want::BadSeqLens),    // does not start at 0
        (vec![0, 9, 5, 14], Want::BadSeqLens), // decreases
        // The token count N is read from cu_seqlens, so ending early makes every tensor
        // too long for it.
        (vec![0, 9, 13], Want::Shape),
        (vec![0, 9, 9, 14], Want::Empty), // an empty sequence
        (vec![0], Want::Empty),           // no sequence
        (vec![], Want::Empty),
    ] {
        let mut y = x.clone();
        y.cu_seqlens = cu.clone();
        let e = forward(&cfg, &y, &phi).unwrap_err();
        let ok = match want {
            Want::BadSeqLens => matches!(e, NsaError::BadSeqLens(_)),
            Want::Empty => matches!(e, NsaError::EmptySequence(_)),
            Want::Shape => matches!(e, NsaError::ShapeMismatch { .. }),
        };
        assert!(ok, "{cu:?}: want {want:?}, got {e:?}");
        assert_eq!(selection_scores(&cfg, &y, &phi).unwrap_err(), e);
    }
}

#[test]
fn phi_kind_and_shapes() {
    let (cfg, x, _) = good();
    // Linear weights for a Mean config, and Mean weights for a Linear config.
    let lin_cfg = NsaConfig {
        phi: PhiKind::Linear,
        ..base()
    };
    let lin = phi(&lin_cfg, 3, 2, 3);
    assert!(matches!(op_error(&cfg, &x, &lin), NsaError::Unsupported(_)));
    assert!(matches!(
        op_error(&lin_cfg, &x, &PhiParams::mean()),
        NsaError::Unsupported(_)
    ));
    // K and V of different kinds.
    let mixed = PhiParams {
        hidden: 0,
        k: lin.k.clone(),
        v: PhiWeights::Mean,
    };
    assert!(matches!(
        op_error(&lin_cfg, &x, &mixed),
        NsaError::Unsupported(_)
    ));
    // A weight tensor of the wrong size.
    let mut short = lin.clone();
    if let PhiWeights::Linear { w, .. } = &mut short.v {
        w.pop();
    }
    match op_error(&lin_cfg, &x, &short) {
        NsaError::ShapeMismatch { name, .. } => assert_eq!(name, "phi_v.w"),
        e => panic!("{e:?}"),
    }
    // MLP with hidden size 0, and an MLP bias of the wrong size.
    let mlp_cfg = NsaConfig {
        phi: PhiKind::Mlp,
        ..base()
    };
    let mut mlp = phi(&mlp_cfg, 3, 2, 4);
    let mut no_hidden = mlp.clone();
    no_hidden.hidden = 0;
    assert_eq!(
        op_error(&mlp_cfg, &x, &no_hidden),
        NsaError::ZeroSize("phi hidden size")
    );
    if let PhiWeights::Mlp { b1, .. } = &mut mlp.k {
        b1.push(0.0);
    }
    match op_error(&mlp_cfg, &x, &mlp) {
        NsaError::ShapeMismatch { name, .. } => assert_eq!(name, "phi_k.b1"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn decode_errors() {
    let cfg = base();
    let phi = PhiParams::mean();
    assert_eq!(
        DecodeCache::<f64>::new(&cfg, 0, 3, 2).unwrap_err(),
        NsaError::ZeroSize("decode batch")
    );
    assert!(matches!(
        DecodeCache::<f64>::new(&NsaConfig { heads: 3, ..base() }, 1, 3, 2),
        Err(NsaError::HeadsNotDivisible { .. })
    ));
    let mut cache = DecodeCache::new(&cfg, 2, 3, 2).unwrap();
    let two = inputs(&cfg, &[1, 1], 3, 2, 5);
    decode::step(&cfg, &mut cache, &two, &phi).unwrap();
    let before = cache.clone();
    let is_decode = |r: nsa::Result<nsa::NsaOutput<f64>>| matches!(r, Err(NsaError::Decode(_)));

    // Batch size differs from the cache's.
    assert!(is_decode(decode::step(
        &cfg,
        &mut cache,
        &inputs(&cfg, &[1], 3, 2, 6),
        &phi
    )));
    assert!(is_decode(decode::step(
        &cfg,
        &mut cache,
        &inputs(&cfg, &[1, 1, 1], 3, 2, 6),
        &phi
    )));
    // More than one token for a sequence in a step.
    assert!(is_decode(decode::step(
        &cfg,
        &mut cache,
        &inputs(&cfg, &[2, 1], 3, 2, 6),
        &phi
    )));
    // Head dims differ from the cache's.
    assert!(is_decode(decode::step(
        &cfg,
        &mut cache,
        &inputs(&cfg, &[1, 1], 4, 2, 6),
        &phi
    )));
    assert!(is_decode(decode::step(
        &cfg,
        &mut cache,
        &inputs(&cfg, &[1, 1], 3, 3, 6),
        &phi
    )));
    // A configuration with other KV heads or another compression geometry.
    let other_kv = small_cfg(4, 4, PhiKind::Mean);
    assert!(is_decode(decode::step(
        &other_kv,
        &mut cache,
        &inputs(&other_kv, &[1, 1], 3, 2, 6),
        &phi
    )));
    let other_l = NsaConfig {
        cmp_block: 8,
        ..base()
    };
    assert!(is_decode(decode::step(&other_l, &mut cache, &two, &phi)));
    // Prefill: sequence index out of range, more than one sequence.
    assert!(is_decode(decode::prefill(
        &cfg,
        &mut cache,
        2,
        &inputs(&cfg, &[3], 3, 2, 7),
        &phi
    )));
    assert!(is_decode(decode::prefill(
        &cfg,
        &mut cache,
        0,
        &inputs(&cfg, &[3, 2], 3, 2, 7),
        &phi
    )));
    // Malformed inputs give the usual validation errors.
    let mut bad = inputs(&cfg, &[3], 3, 2, 8);
    bad.q.pop();
    assert!(matches!(
        decode::prefill(&cfg, &mut cache, 0, &bad, &phi),
        Err(NsaError::ShapeMismatch { .. })
    ));
    // Nothing was appended by any failed call.
    assert_eq!(cache, before);
}
