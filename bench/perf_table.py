#!/usr/bin/env python3
"""Builds the README's performance tables from the newest result files in bench/results/.

    python3 bench/perf_table.py            # print the tables
    python3 bench/perf_table.py --readme   # replace the block between the perf-table markers in README.md

Nothing is typed in by hand: every cell is the median `ms` of one record (the files say which
machine, date and command produced them). A missing measurement prints as "-".
"""
import argparse
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def newest(prefix):
    """The newest `<prefix>-<date>.json` (exact prefix: `cpu` does not match `cpu-fwd-bwd`)."""
    pat = re.compile(re.escape(prefix) + r"-(\d{4}-\d{2}-\d{2})\.json$")
    files = [f for f in glob.glob(os.path.join(RESULTS, prefix + "-*.json")) if pat.search(f)]
    return max(files, key=lambda f: pat.search(f).group(1)) if files else None


def load(*prefixes):
    recs, used = [], []
    for p in prefixes:
        f = newest(p)
        if f:
            recs += json.load(open(f))
            used.append(os.path.relpath(f, ROOT))
    return recs, used


def pick(recs, **key):
    """The fastest record matching every key (a peer measured in several variants, e.g. torch's
    GQA and folded-head decode, is shown by its strongest one); None: no such record."""
    hits = [r for r in recs if all(r.get(k) == v for k, v in key.items()) and r.get("ms") is not None]
    return min(hits, key=lambda r: r["ms"]) if hits else None


def ms(r, unit=1.0, digits=3):
    if r is None:
        return "-"
    v = r["ms"] * unit
    return f"{v:.{digits}g}" if v < 100 else f"{v:.0f}"


def ratio(a, b):
    return "-" if a is None or b is None else f"{b['ms'] / a['ms']:.1f}x"


def length_table(fwd, bwd, dk, dv, source):
    """NSA forward / backward against the dense and NSA peers over the context lengths."""
    dims = f"dk=dv={dk}" if dk == dv else f"dk={dk}, dv={dv}"
    out = [f"GPU, B=1, HQ=64, HKV=4, {dims}, bf16, ms (median); {source}:\n"]
    out.append("| T | NSA fwd | cuDNN fwd | flash fwd | fla-nsa fwd | NSA bwd | cuDNN bwd | fla-nsa bwd | NSA fwd speedup vs cuDNN |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    shape = dict(batch=1, heads=64, kv_heads=4, dk=dk, dv=dv)
    for t in (8192, 16384, 32768, 65536, 131072):
        nf = pick(fwd, op="forward", impl="nsa-cuda", T=t, **shape)
        cf = pick(fwd, op="forward", impl="torch-sdpa-cudnn", T=t, **shape)
        ff = pick(fwd, op="forward", impl="torch-sdpa-flash", T=t, **shape)
        lf = pick(fwd, op="forward", impl="fla-nsa", T=t, **shape)
        nb = pick(bwd, op="backward", impl="nsa-cuda", T=t, **shape)
        cb = pick(bwd, op="backward", impl="torch-sdpa-cudnn", T=t, **shape)
        lb = pick(bwd, op="backward", impl="fla-nsa", T=t, **shape)
        out.append(f"| {t // 1024}k | {ms(nf)} | {ms(cf)} | {ms(ff)} | {ms(lf)} | {ms(nb)} | {ms(cb)} | {ms(lb)} | {ratio(nf, cf)} |")
    return out


def gpu_tables():
    out = []
    fwd, f1 = load("h100-fwd")
    bwd, f2 = load("h100-bwd")
    dec, f3 = load("h100-decode")
    if not (f1 or f2 or f3):
        return out
    out += length_table(fwd, bwd, 128, 128, f"from {', '.join(f1 + f2)}")
    out.append("")
    out += length_table(fwd, bwd, 192, 128, "the paper's head dims")
    out.append("\nGPU, GQA group size G at T=64k (HQ=64, HKV=64/G, dk=dv=128), ms (median):\n")
    out.append("| G | NSA fwd | cuDNN fwd | NSA bwd | cuDNN bwd | NSA fwd speedup vs cuDNN | NSA bwd speedup vs cuDNN |")
    out.append("|---|---|---|---|---|---|---|")
    for g in (1, 2, 4, 8, 16):
        key = dict(batch=1, T=65536, heads=64, kv_heads=64 // g, dk=128, dv=128)
        nf = pick(fwd, op="forward", impl="nsa-cuda", **key)
        cf = pick(fwd, op="forward", impl="torch-sdpa-cudnn", **key)
        nb = pick(bwd, op="backward", impl="nsa-cuda", **key)
        cb = pick(bwd, op="backward", impl="torch-sdpa-cudnn", **key)
        out.append(f"| {g} | {ms(nf)} | {ms(cf)} | {ms(nb)} | {ms(cb)} | {ratio(nf, cf)} | {ratio(nb, cb)} |")
    if f3:
        out.append(f"\nGPU decode step, HQ=64, HKV=4, D=128, bf16, us (median, CUDA graphs); from {', '.join(f3)}:\n")
        out.append("| context | batch | NSA | cuDNN dense | flash dense | fla-nsa | NSA speedup vs cuDNN | NSA % of copy bandwidth |")
        out.append("|---|---|---|---|---|---|---|---|")
        for t in (8192, 16384, 32768, 65536, 131072):
            for b in (1, 32):
                key = dict(op="decode", T=t, batch=b, heads=64, kv_heads=4, dk=128, dv=128)
                n = pick(dec, impl="nsa-cuda", **key)
                c = pick(dec, impl="torch-sdpa-cudnn", **key)
                f = pick(dec, impl="torch-sdpa-flash", **key)
                l = pick(dec, impl="fla-nsa", **key)
                bw = "-" if n is None or n.get("pct_copy_bw") is None else f"{n['pct_copy_bw']:.0f}%"
                out.append(f"| {t // 1024}k | {b} | {ms(n, 1e3)} | {ms(c, 1e3)} | {ms(f, 1e3)} | {ms(l, 1e3)} | {ratio(n, c)} | {bw} |")
    return out


def cpu_tables():
    out = []
    recs, used = load("cpu", "cpu-fwd-bwd", "cpu-fwd-bwd-32k")
    if not used:
        return out
    out.append(f"\nCPU, f32, B=1, 16 threads of the GPU host's Xeon, ms (median); from {', '.join(used)}:\n")
    out.append("| op | T | HQ x HKV x D | NSA | our dense | torch CPU SDPA | NSA speedup vs torch |")
    out.append("|---|---|---|---|---|---|---|")
    for op, lens in (("forward", (2048, 4096, 8192, 16384, 32768)),
                     ("forward_backward", (2048, 4096, 8192, 16384, 32768)),
                     ("decode", (8192, 16384, 32768, 65536))):
        for hq, hkv, d in ((16, 1, 64), (32, 2, 128)):
            for t in lens:
                key = dict(op=op, T=t, heads=hq, kv_heads=hkv, dk=d, dv=d, batch=1)
                n = pick(recs, impl="nsa", **key)
                dn = pick(recs, impl="dense-cpu", **key)
                tc = pick(recs, impl="torch-cpu", **key)
                if n is None and tc is None:
                    continue
                out.append(f"| {op} | {t // 1024}k | {hq}x{hkv}x{d} | {ms(n)} | {ms(dn)} | {ms(tc)} | {ratio(n, tc)} |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--readme", action="store_true", help="rewrite the block in README.md")
    args = ap.parse_args()
    text = "\n".join(gpu_tables() + cpu_tables())
    if not args.readme:
        print(text)
        return
    path = os.path.join(ROOT, "README.md")
    readme = open(path).read()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    open(path, "w").write(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
