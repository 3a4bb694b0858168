//! Benchmark records: one measurement per [`BenchRecord`], written as a markdown table and a
//! JSON list to `bench/results/<name>-<date>.{md,json}`. The JSON schema is shared with the
//! Python peer script (`bench/peers.py`): its records (extra fields included) load here too.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRecord {
    /// `YYYY-MM-DD`
    pub date: String,
    /// CPU model (or GPU name) and thread count.
    pub machine: String,
    /// `forward`, `backward`, `forward_backward` or `decode`.
    pub op: String,
    /// `nsa`, `dense-cpu`, `torch-cpu`, ...
    #[serde(rename = "impl")]
    pub impl_: String,
    pub batch: usize,
    /// Sequence length (for `decode`: the context length).
    #[serde(rename = "T")]
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dk: usize,
    pub dv: usize,
    /// Threads used (CPU).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Median wall time, milliseconds.
    pub ms: f64,
    /// Effective TFLOP/s (flops actually needed, see `cpu.rs`), when meaningful.
    #[serde(default)]
    pub tflops: Option<f64>,
    /// Effective GFLOP/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// The flop count behind `gflops`/`tflops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flops: Option<f64>,
    /// Speedup of this record over the dense baseline of the same shape (`dense ms / ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speedup: Option<f64>,
    /// Free-form notes (a string or a list of strings in the JSON).
    #[serde(
        default,
        deserialize_with = "string_or_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub notes: Vec<String>,
    /// Any other field (peer records carry device, dtype, software, ...), kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => vec![],
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        other => vec![other.to_string()],
    })
}

impl BenchRecord {
    /// The shape a record measures: records with equal keys are comparable.
    pub fn key(&self) -> (String, usize, usize, usize, usize, usize, usize) {
        (
            self.op.clone(),
            self.batch,
            self.t,
            self.heads,
            self.kv_heads,
            self.dk,
            self.dv,
        )
    }
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// CPU model from `/proc/cpuinfo` (falls back to the architecture) and the thread count.
pub fn machine_name(threads: usize) -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{model} ({cores} logical CPUs, {threads} threads used)")
}

/// Reads a JSON list of records (e.g. written by the peer script).
pub fn read_records(path: &Path) -> nsa::Result<Vec<BenchRecord>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| nsa::NsaError::Io(format!("{}: {e}", path.display())))?;
    let mut records: Vec<BenchRecord> = serde_json::from_str(&text)
        .map_err(|e| nsa::NsaError::Format(format!("{}: {e}", path.display())))?;
    records.iter_mut().for_each(demote_dense_equivalent_tflops);
    Ok(records)
}

/// Peer files of 2026-11-23 count a sparse peer's (fla-nsa) `tflops` as dense causal flops over
/// its time ("dense-equivalent", said in its note). Next to our effective rates that column would
/// read as a real flop rate, so such a value moves to `dense_equiv_tflops` and `tflops` is unset.
fn demote_dense_equivalent_tflops(r: &mut BenchRecord) {
    let note = r.extra.get("note").and_then(Value::as_str).unwrap_or("");
    let dense_equiv =
        note.contains("dense-equivalent") || r.notes.iter().any(|n| n.contains("dense-equivalent"));
    if dense_equiv {
        if let Some(t) = r.tflops.take() {
            r.extra.insert("dense_equiv_tflops".into(), Value::from(t));
        }
    }
}

/// `forward_backward` records for the implementations of `records` that have a `forward` and a
/// `backward` record of the same shape but no measured `forward_backward` one: the sum of the two
/// medians, as for our own forward+backward, said in the record's notes. Measured
/// `forward_backward` records are left as they are and never duplicated.
pub fn summed_forward_backward(records: &[BenchRecord]) -> Vec<BenchRecord> {
    // the implementation and the shape, without the op
    let shape = |r: &BenchRecord| {
        let (_, b, t, hq, hkv, dk, dv) = r.key();
        (r.impl_.clone(), b, t, hq, hkv, dk, dv)
    };
    let measured: Vec<_> = records
        .iter()
        .filter(|r| r.op == "forward_backward")
        .map(shape)
        .collect();
    let mut out: Vec<BenchRecord> = Vec::new();
    for f in records.iter().filter(|r| r.op == "forward") {
        let key = shape(f);
        if measured.contains(&key) || out.iter().any(|o| shape(o) == key) {
            continue;
        }
        let Some(b) = records
            .iter()
            .find(|r| r.op == "backward" && shape(r) == key)
        else {
            continue;
        };
        let mut fb = f.clone();
        fb.op = "forward_backward".into();
        fb.ms = f.ms + b.ms;
        fb.tflops = None;
        fb.gflops = None;
        fb.flops = None;
        fb.speedup = None;
        fb.extra.remove("dense_equiv_tflops");
        fb.notes = vec![format!(
            "forward median ({:.3} ms) + backward median ({:.3} ms), measured separately",
            f.ms, b.ms
        )];
        out.push(fb);
    }
    out
}

/// Fills `speedup` of every record that has a dense baseline (`impl == baseline`) of the same
/// shape: `baseline ms / ms`, against the baseline's fastest record of that shape (a peer may
/// be measured in several variants, e.g. GQA and folded-head decode).
pub fn fill_speedups(records: &mut [BenchRecord], baseline: &str) {
    let mut base: BTreeMap<_, f64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.impl_ == baseline) {
        let b = base.entry(r.key()).or_insert(r.ms);
        *b = b.min(r.ms);
    }
    for r in records.iter_mut() {
        if r.impl_ != baseline {
            if let Some(&b) = base.get(&r.key()) {
                r.speedup = Some(b / r.ms);
            }
        }
    }
}

/// A markdown table of the records (grouped by shape), with a comparison section: the speedup
/// of `ours` over every other implementation measured on the same shape.
pub fn markdown(title: &str, records: &[BenchRecord], ours: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    let machines: Vec<&str> = {
        let mut m: Vec<&str> = records.iter().map(|r| r.machine.as_str()).collect();
        m.sort();
        m.dedup();
        // a peer file names the GPU without our " (sm_90a)": one machine, listed once
        let all = m.clone();
        m.retain(|a| {
            !all.iter()
                .any(|b| b.len() > a.len() && b.starts_with(&format!("{a} (")))
        });
        m
    };
    for m in machines {
        let _ = writeln!(s, "- machine: {m}");
    }
    let _ = writeln!(s, "\n| op | impl | B | T | HQ | HKV | dk | dv | threads | ms (median) | GFLOP/s | speedup vs dense |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut sorted: Vec<&BenchRecord> = records.iter().collect();
    sorted.sort_by(|a, b| (a.key(), &a.impl_).cmp(&(b.key(), &b.impl_)));
    for r in &sorted {
        let gf = r.gflops.or(r.tflops.map(|t| t * 1e3));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} | {} | {} |",
            r.op,
            r.impl_,
            r.batch,
            r.t,
            r.heads,
            r.kv_heads,
            r.dk,
            r.dv,
            r.threads
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            r.ms,
            gf.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into()),
            r.speedup
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    // ours vs everybody else, same shape
    let mut lines = Vec::new();
    for r in records.iter().filter(|r| r.impl_ == ours) {
        for p in records
            .iter()
            .filter(|p| p.impl_ != ours && p.key() == r.key())
        {
            lines.push(format!(
                "| {} | {} | {} | {}x{}x{}/{} | {} | {:.2}x |",
                r.op,
                r.batch,
                r.t,
                r.heads,
                r.kv_heads,
                r.dk,
                r.dv,
                p.impl_,
                p.ms / r.ms
            ));
        }
    }
    if !lines.is_empty() {
        lines.sort();
        let _ = writeln!(s, "\n## {ours} speedup over the others (same shape)\n");
        let _ = writeln!(s, "| op | B | T | HQxHKVxdk/dv | other | speedup |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for l in lines {
            let _ = writeln!(s, "{l}");
        }
    }
    let notes: Vec<String> = {
        let mut n: Vec<String> = records
            .iter()
            .flat_map(|r| r.notes.iter().map(|x| format!("{}: {x}", r.impl_)))
            .collect();
        n.sort();
        n.dedup();
        n
    };
    if !notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// Writes `<dir>/<name>-<date>.md` and `.json`; returns both paths.
pub fn write_results(
    dir: &Path,
    name: &str,
    date: &str,
    title: &str,
    records: &[BenchRecord],
    ours: &str,
) -> nsa::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| nsa::NsaError::Io(format!("{}: {e}", dir.display())))?;
    let md = dir.join(format!("{name}-{date}.md"));
    let js = dir.join(format!("{name}-{date}.json"));
    std::fs::write(&md, markdown(title, records, ours))
        .map_err(|e| nsa::NsaError::Io(format!("{}: {e}", md.display())))?;
    let text = serde_json::to_string_pretty(records)?;
    std::fs::write(&js, text + "\n")
        .map_err(|e| nsa::NsaError::Io(format!("{}: {e}", js.display())))?;
    Ok((md, js))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(impl_: &str, ms: f64) -> BenchRecord {
        BenchRecord {
            date: "2026-01-02".into(),
            machine: "m".into(),
            op: "forward".into(),
            impl_: impl_.into(),
            batch: 1,
            t: 2048,
            heads: 16,
            kv_heads: 1,
            dk: 64,
            dv: 64,
            threads: Some(2),
            ms,
            tflops: None,
            gflops: Some(1.0),
            flops: None,
            speedup: None,
            notes: vec![],
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn peer_records_round_trip_with_extra_fields() {
        let text = r#"[{"date":"2026-01-01","machine":"x","device":"cpu","op":"forward","impl":"torch-cpu",
            "batch":1,"T":2048,"heads":16,"kv_heads":1,"dk":64,"dv":64,"threads":16,"ms":12.5,
            "tflops":0.1,"dtype":"float32","notes":"sdpa math"}]"#;
        let recs: Vec<BenchRecord> = serde_json::from_str(text).unwrap();
        assert_eq!(recs[0].impl_, "torch-cpu");
        assert_eq!(recs[0].t, 2048);
        assert_eq!(recs[0].notes, vec!["sdpa math".to_string()]);
        assert_eq!(recs[0].extra["dtype"], Value::String("float32".into()));
        let back = serde_json::to_value(&recs[0]).unwrap();
        assert_eq!(back["impl"], "torch-cpu");
        assert_eq!(back["T"], 2048);
        assert_eq!(back["device"], "cpu");
    }

    #[test]
    fn dense_equivalent_peer_rates_leave_the_tflops_column() {
        let dir = std::env::temp_dir().join(format!("nsa-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peers.json");
        std::fs::write(
            &path,
            r#"[{"date":"d","machine":"m","op":"forward","impl":"fla-nsa","batch":1,"T":65536,
            "heads":64,"kv_heads":4,"dk":128,"dv":128,"ms":57.3,"tflops":1228.8,
            "note":"fla parallel_nsa; tflops counts dense causal flops (dense-equivalent)"},
            {"date":"d","machine":"m","op":"forward","impl":"torch-sdpa-cudnn","batch":1,"T":65536,
            "heads":64,"kv_heads":4,"dk":128,"dv":128,"ms":111.6,"tflops":630.4}]"#,
        )
        .unwrap();
        let recs = read_records(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(recs[0].tflops, None);
        assert_eq!(recs[0].extra["dense_equiv_tflops"], Value::from(1228.8));
        assert_eq!(recs[1].tflops, Some(630.4));
        assert!(!recs[1].extra.contains_key("dense_equiv_tflops"));
    }

    #[test]
    fn speedups_and_table() {
        let mut v = vec![
            rec("dense-cpu", 30.0),
            rec("nsa", 10.0),
            rec("torch-cpu", 20.0),
        ];
        fill_speedups(&mut v, "dense-cpu");
        assert_eq!(v[1].speedup, Some(3.0));
        assert_eq!(v[0].speedup, None);
        let md = markdown("t", &v, "nsa");
        assert!(md.contains("| 3.00x |"), "{md}");
        assert!(md.contains("| torch-cpu | 2.00x |"), "{md}");
    }

    #[test]
    fn forward_backward_is_summed_only_where_not_measured() {
        let mut f = rec("torch-sdpa-cudnn", 10.0);
        let mut b = f.clone();
        b.op = "backward".into();
        b.ms = 25.0;
        let lone = rec("fla-nsa", 7.0); // no backward: nothing to sum
        let mut fm = rec("torch-sdpa-flash", 12.0);
        let mut bm = fm.clone();
        bm.op = "backward".into();
        let mut measured = fm.clone();
        measured.op = "forward_backward".into();
        fm.t = 2048;
        bm.ms = 30.0;
        measured.ms = 41.0;
        f.tflops = Some(1.0);
        let sums = summed_forward_backward(&[f, b, lone, fm, bm, measured]);
        assert_eq!(sums.len(), 1, "{sums:?}");
        assert_eq!(sums[0].impl_, "torch-sdpa-cudnn");
        assert_eq!(sums[0].op, "forward_backward");
        assert_eq!(sums[0].ms, 35.0);
        assert_eq!(sums[0].tflops, None);
        assert!(sums[0].notes[0].contains("measured separately"));
    }

    #[test]
    fn speedups_are_over_the_fastest_baseline_variant() {
        let mut v = vec![
            rec("dense-cpu", 30.0),
            rec("dense-cpu", 90.0),
            rec("nsa", 10.0),
        ];
        fill_speedups(&mut v, "dense-cpu");
        assert_eq!(v[2].speedup, Some(3.0));
        let mut w = vec![
            rec("nsa", 10.0),
            rec("dense-cpu", 90.0),
            rec("dense-cpu", 30.0),
        ];
        fill_speedups(&mut w, "dense-cpu");
        assert_eq!(w[0].speedup, Some(3.0));
    }

    #[test]
    fn a_machine_named_with_and_without_its_arch_is_listed_once() {
        let mut a = rec("nsa-cuda", 1.0);
        a.machine = "NVIDIA H100 80GB HBM3 (sm_90a)".into();
        let mut b = rec("torch-sdpa-cudnn", 2.0);
        b.machine = "NVIDIA H100 80GB HBM3".into();
        let mut c = rec("dense-cpu", 3.0);
        c.machine = "NVIDIA H100".into();
        let md = markdown("t", &[a, b, c], "nsa-cuda");
        assert_eq!(md.matches("- machine: ").count(), 2, "{md}");
        assert!(
            md.contains("- machine: NVIDIA H100 80GB HBM3 (sm_90a)"),
            "{md}"
        );
        assert!(md.contains("- machine: NVIDIA H100\n"), "{md}");
    }

    #[test]
    fn results_round_trip_bit_for_bit() {
        // `nsa bench --render` reads a results file back and writes it again
        let mut r = rec("nsa", 7.583_375_999_999_999_5);
        r.speedup = Some(0.666_975_320_586_114_1);
        let text = serde_json::to_string(&vec![r.clone()]).unwrap();
        let back: Vec<BenchRecord> = serde_json::from_str(&text).unwrap();
        assert_eq!(back[0].ms.to_bits(), r.ms.to_bits());
        assert_eq!(
            back[0].speedup.unwrap().to_bits(),
            r.speedup.unwrap().to_bits()
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_513), (2026, 3, 1));
    }
}
