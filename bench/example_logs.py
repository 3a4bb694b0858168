#!/usr/bin/env python3
"""Turn the tables printed by the CUDA timing examples into result records.

`cuda_bench_bwd` and `cuda_bench_decode` (crates/nsa/examples) print one table row per
measurement; this script parses those rows (nothing is typed in by hand), merges peer
records of the same op from bench/peers.py JSON files, and writes `<name>-<date>.md` and
`.json` in the schema of bench/README.md.

    python3 bench/example_logs.py bwd    LOG --peers P.json ... --out bench/results/h100-bwd
    python3 bench/example_logs.py decode LOG --peers P.json ... --out bench/results/h100-decode
"""
import argparse
import json
import re
import sys


def machine_of(log):
    m = re.search(r"device: (.+)", log)
    return m.group(1).strip() if m else "unknown"


def parse_bwd(log, date):
    recs = []
    for line in log.splitlines():
        cells = [c.split() for c in line.split("|")]
        if len(cells) < 6 or not cells[0] or not cells[0][0].isdigit():
            continue
        t, hq, hkv, dk, dv = map(int, cells[0])
        bwd_ms, fwd_ms = map(float, cells[4])
        peak, bwd_gib = map(float, cells[5])
        base = dict(date=date, machine=machine_of(log), device="cuda", batch=1, T=t,
                    heads=hq, kv_heads=hkv, dk=dk, dv=dv, threads=None, tflops=None,
                    dtype="bfloat16", impl="nsa-cuda")
        recs.append(dict(base, op="backward", ms=bwd_ms, peak_mem_gib=peak,
                         bwd_extra_gib=bwd_gib,
                         kernels_ms=dict(zip(["cmp_dq", "cmp_kv", "mean"], map(float, cells[1])),
                                         **dict(zip(["win_dq", "win_kv"], map(float, cells[2]))),
                                         **dict(zip(["index", "sel_dq", "sel_kv"], map(float, cells[3])))),
                         note="deterministic (no float atomics); peak_mem_gib = peak device memory of forward+backward"))
        recs.append(dict(base, op="forward_backward", ms=round(fwd_ms + bwd_ms, 4), peak_mem_gib=peak,
                         note="sum of the forward and backward medians of the same run"))
    return recs


def parse_decode(log, date):
    recs = []
    bw = re.search(r"copy: (\d+) GB/s", log)
    for line in log.splitlines():
        cells = [c.split() for c in line.split("|")]
        if len(cells) < 5 or not cells[0] or not cells[0][0].isdigit():
            continue
        ctx, dk, dv, b = map(int, cells[0])
        eager_us, graph_us, tok_s = map(float, cells[1])
        kv_mb, bound_mb, other_mb = map(float, cells[2])
        gbps = float(cells[3][0])
        recs.append(dict(date=date, machine=machine_of(log), device="cuda", op="decode",
                         impl="nsa-cuda", batch=b, T=ctx, heads=64, kv_heads=4, dk=dk, dv=dv,
                         threads=None, tflops=None, dtype="bfloat16", ms=graph_us / 1000.0,
                         eager_ms=eager_us / 1000.0, tokens_per_s=tok_s, kv_mb=kv_mb,
                         bound_mb=bound_mb, other_mb=other_mb, gbps=gbps,
                         copy_gbps=float(bw.group(1)) if bw else None,
                         cuda_graph=True,
                         note="per step, CUDA-graph replay; kv_mb = K/V bytes read, bound_mb = the selected+compressed+window token bound"))
    return recs


def parse_cpu(log, date):
    """Progress lines of `nsa bench --device cpu` (one per measurement, printed as it goes)."""
    recs = []
    pat = re.compile(r"^\s+(forward|forward_backward|decode)\s+nsa\s+B=(\d+) T=(\d+)\s+(\d+)x(\d+)x(\d+)\s+([\d.]+) ms\s+([\d.]+) GFLOP/s")
    threads = re.search(r"--threads (\d+)", log)
    for line in log.splitlines():
        m = pat.match(line)
        if not m:
            continue
        op, b, t, hq, hkv, d, ms, gf = m.groups()
        recs.append(dict(date=date, machine="Intel(R) Xeon(R) Processor (16 logical CPUs)", device="cpu",
                         op=op, impl="nsa", batch=int(b), T=int(t), heads=int(hq), kv_heads=int(hkv),
                         dk=int(d), dv=int(d), threads=16, ms=float(ms), gflops=float(gf), tflops=float(gf) / 1e3,
                         note="f32, paper blocks l=32 d=16 l'=64 n=16 w=512, phi mean, independent K/V per branch"))
    return recs


def key(r):
    return (r["op"], r["batch"], r["T"], r["heads"], r["kv_heads"], r["dk"], r["dv"])


def markdown(title, recs, sources, ours):
    out = [f"# {title}", ""]
    for m in sorted({r["machine"] for r in recs}):
        out.append(f"- machine: {m}")
    out += [f"- {s}" for s in sources]
    out += ["", "| op | impl | variant | B | T | HQ | HKV | dk | dv | ms (median) | extra |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (key(r), r["impl"])):
        extra = []
        for f in ("peak_mem_gib", "gbps", "tokens_per_s"):
            if r.get(f) is not None:
                extra.append(f"{f} {r[f]}")
        out.append(f"| {r['op']} | {r['impl']} | {r.get('variant') or ''} | {r['batch']} | {r['T']} | "
                   f"{r['heads']} | {r['kv_heads']} | {r['dk']} | {r['dv']} | {r['ms']:.4f} | {', '.join(extra)} |")
    out += ["", f"## {ours} speedup over each peer (same op and shape; best variant of the peer)", "",
            "| op | B | T | HQxHKVxdk/dv | peer | peer ms | ours ms | speedup |", "|---|---|---|---|---|---|---|---|"]
    mine = {key(r): r for r in recs if r["impl"] == ours}
    best = {}
    for r in recs:
        if r["impl"] != ours and key(r) in mine:
            k = (key(r), r["impl"])
            if k not in best or r["ms"] < best[k]["ms"]:
                best[k] = r
    for (k, impl), p in sorted(best.items()):
        o = mine[k]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]}x{k[4]}x{k[5]}/{k[6]} | {impl} | {p['ms']:.4f} | "
                   f"{o['ms']:.4f} | {p['ms'] / o['ms']:.2f}x |")
    notes = sorted({f"{r['impl']}: {r['note']}" for r in recs if r.get("note")})
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["bwd", "decode", "cpu"])
    ap.add_argument("log")
    ap.add_argument("--peers", nargs="*", default=[])
    ap.add_argument("--date", required=True)
    ap.add_argument("--out", required=True, help="path prefix; -<date>.md/.json are added")
    ap.add_argument("--source", action="append", default=[], help="a line on where the numbers come from")
    a = ap.parse_args()
    log = open(a.log).read()
    parse = {"bwd": parse_bwd, "decode": parse_decode, "cpu": parse_cpu}[a.kind]
    recs = parse(log, a.date)
    ours = "nsa" if a.kind == "cpu" else "nsa-cuda"
    device = "cpu" if a.kind == "cpu" else "cuda"
    if not recs:
        sys.exit(f"no rows parsed from {a.log}")
    ops = {r["op"] for r in recs}
    for p in a.peers:
        for r in json.load(open(p)):
            if r["op"] in ops and r["impl"] != ours and r.get("device") == device:
                r.setdefault("source_file", p.split("/")[-1])
                recs.append(r)
    title = {"bwd": "NSA CUDA backward", "decode": "NSA CUDA decode", "cpu": "NSA CPU"}[a.kind]
    title = f"{title} benchmark, {a.date}"
    with open(f"{a.out}-{a.date}.json", "w") as f:
        json.dump(recs, f, indent=1)
    with open(f"{a.out}-{a.date}.md", "w") as f:
        f.write(markdown(title, recs, a.source, ours))
    print(f"wrote {a.out}-{a.date}.md/.json ({len(recs)} records)")


if __name__ == "__main__":
    main()
