#!/usr/bin/env python3
"""Peer baselines for `nsa bench`: dense attention through PyTorch and fla's NSA.

Measures, on the GPU machine (python3 = PyTorch 2.11 + Triton 3.6) or on a CPU:
  torch-sdpa-cudnn  F.scaled_dot_product_attention forced to SDPBackend.CUDNN_ATTENTION
  torch-sdpa-flash  F.scaled_dot_product_attention forced to SDPBackend.FLASH_ATTENTION
  fla-nsa           flash-linear-attention 0.6.0 fla.ops.nsa.parallel_nsa (Triton)
  torch-cpu         F.scaled_dot_product_attention on the CPU, f32, torch.set_num_threads(N)
and writes one JSON record per measurement (schema in bench/README.md) to --out.

Timing (device/METHOD.md): one untimed cold call (compilation, autotuning, cuDNN plans),
then warm-up calls, then per-call CUDA events (host clock on the CPU) with the L2 cache
flushed before every timed call, and the median reported. Inputs are fresh random tensors,
rotated among several sets where one set would fit in the cache. The cold call's outputs
must be finite. A missing package, a missing GPU, a backend that refuses a shape or an
out-of-memory error is a printed skip, never a crash of the whole run.
"""

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the script must still run (and write an empty list) without torch
    torch = None
    F = None

GIB = float(1 << 30)

IMPL_CUDNN = "torch-sdpa-cudnn"
IMPL_FLASH = "torch-sdpa-flash"
IMPL_FLA = "fla-nsa"
IMPL_CPU = "torch-cpu"
CUDA_IMPLS = (IMPL_CUDNN, IMPL_FLASH, IMPL_FLA)
CPU_IMPLS = (IMPL_CPU,)

OPS_CUDA = ("forward", "backward", "forward_backward", "decode")
OPS_CPU = ("forward", "backward", "forward_backward", "decode")

# Bytes of input that must be exceeded by the rotated input sets (a multiple of the cache).
ROTATE_FACTOR = 4
MAX_SETS = 8


class Skip(Exception):
    """A measurement that cannot be made here; printed, never recorded."""


def log(msg):
    print(msg, flush=True)


def skip(what, why):
    log(f"SKIP {what}: {why}")


def csv_ints(text):
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def csv_strs(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


def parse_dims(text):
    """'128:128,192:128' -> [(128, 128), (192, 128)] (dk:dv)."""
    out = []
    for item in csv_strs(text):
        dk, dv = item.split(":")
        out.append((int(dk), int(dv)))
    return out


def parse_cpu_shapes(text):
    """'16:1:64:64,32:2:128:128' -> [(HQ, HKV, dk, dv), ...]."""
    out = []
    for item in csv_strs(text):
        hq, hkv, dk, dv = (int(x) for x in item.split(":"))
        out.append((hq, hkv, dk, dv))
    return out


# ---------------------------------------------------------------------------------------------
# Flop and byte counts
# ---------------------------------------------------------------------------------------------

def causal_fwd_flops(b, hq, t, dk, dv):
    """Dense causal forward: QK^T and PV over the T*T/2 visible pairs, 2 flops per MAC.

    2*B*HQ*(T*T/2)*(dk+dv); for dk = dv = D this is 4*B*HQ*T*T/2*D.
    """
    return 2.0 * b * hq * (t * t / 2.0) * (dk + dv)


def op_flops(op, b, hq, t, dk, dv):
    fwd = causal_fwd_flops(b, hq, t, dk, dv)
    if op == "forward":
        return fwd
    if op == "backward":
        return 2.5 * fwd
    if op == "forward_backward":
        return 3.5 * fwd
    return None  # decode: bandwidth, not flops


def decode_bytes(b, hq, hkv, t, dk, dv, elem):
    """Fewest bytes one decode step must move: the K/V cache once, plus q and o."""
    return elem * (b * hkv * t * (dk + dv) + b * hq * (dk + dv))


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def gpu_driver():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def software_versions(fla_version, device):
    parts = []
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
        if device == "cuda" and torch.version.cuda:
            parts.append(f"cuda {torch.version.cuda}")
        if device == "cuda" and torch.backends.cudnn.is_available():
            parts.append(f"cudnn {torch.backends.cudnn.version()}")
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if fla_version:
        parts.append(f"fla {fla_version}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

class Timer:
    """Median time of callables, cycling among input sets (one callable per set)."""

    def __init__(self, device, warmup_ms, rep_ms, min_reps, max_reps):
        self.device = device
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.flush_buf = None
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (50 << 20)
            self.cache_bytes = l2
            # Writing a buffer well over the L2 size evicts the previous call's data.
            self.flush_buf = torch.empty(max(256 << 20, 4 * l2), dtype=torch.int8, device="cuda")
        else:
            self.cache_bytes = 64 << 20  # a generous last-level cache

    def n_sets(self, set_bytes):
        if set_bytes <= 0:
            return 1
        return max(1, min(MAX_SETS, math.ceil(ROTATE_FACTOR * self.cache_bytes / set_bytes)))

    def _flush(self):
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def _one(self, fn):
        """Time one call (ms)."""
        if self.device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self._flush()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def run(self, fns):
        """fns: warm callables (the cold call is the caller's). Returns (median_ms, min_ms, reps).

        The first call after the cold one is timed as an estimate. When it alone covers the
        warm-up time (slow points) it also counts as the first timed call, which saves one
        call where each costs seconds.
        """
        n = len(fns)
        est = self._one(fns[0])
        reps = int(max(self.min_reps, min(self.max_reps, self.rep_ms / max(est, 1e-3))))
        if est >= self.warmup_ms:
            times, first = [est], 1
        else:
            times, first = [], 0
            n_warm = int(min(50, self.warmup_ms / max(est, 1e-3) - 1))
            for i in range(n_warm):
                fns[(i + 1) % n]()
        if self.device == "cuda":
            torch.cuda.synchronize()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(first, reps)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(first, reps)]
            for j, i in enumerate(range(first, reps)):
                self._flush()
                starts[j].record()
                fns[i % n]()
                ends[j].record()
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            for i in range(first, reps):
                t0 = time.perf_counter()
                fns[i % n]()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times), reps


def all_finite(obj):
    if obj is None:
        return True
    if isinstance(obj, (list, tuple)):
        return all(all_finite(x) for x in obj if x is not None)
    return bool(torch.isfinite(obj).all().item())


def is_oom(err):
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return "out of memory" in str(err).lower()


def short(err, limit=240):
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}"


def refusal_reason(caught, err):
    """The backend's own reasons (PyTorch's UserWarnings) for refusing a shape, trimmed."""
    msgs = []
    for w in caught:
        m = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message))
        m = " ".join(m.split())
        if not m or m.endswith("because:") or "runtime disabled" in m:
            continue
        msgs.append(m[:200])
    return "; ".join(dict.fromkeys(msgs)) or short(err)


def free_memory():
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def capture_graphs(fns):
    """CUDA-graph each callable (after a side-stream warm-up); returns replay callables."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    replays = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replays.append(graph.replay)
    torch.cuda.synchronize()
    return replays


# ---------------------------------------------------------------------------------------------
# Cases: each builds input sets and returns (cold_callable, warm callables, set bytes, notes)
# ---------------------------------------------------------------------------------------------

def randn(shape, dtype, device, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def gates(shape, dtype, device, requires_grad=False):
    """Gate values in (0, 1), as the sigmoid of a gate MLP would give."""
    return torch.rand(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def wrap_op(op, call, leaves, out_shape_like):
    """Turn a forward callable into the callable timed for `op`.

    forward / decode: call() under no_grad (the caller holds no_grad);
    backward: one forward kept, then autograd.grad(o, leaves, do, retain_graph=True);
    forward_backward: forward + autograd.grad per call.
    """
    if op in ("forward", "decode"):
        return call
    if op == "backward":
        o = call()
        do = torch.randn_like(o)
        return lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
    if op == "forward_backward":
        do = torch.randn(*out_shape_like, dtype=leaves[0].dtype, device=leaves[0].device)
        return lambda: torch.autograd.grad(call(), leaves, do)
    raise ValueError(op)


def dense_sets(op, mode, b, hq, hkv, t, dk, dv, dtype, device, n_sets):
    """Input sets for dense SDPA in torch's B,H,T,D layout.

    mode: "native"  GQA through enable_gqa=True (or G = 1);
          "expand"  K/V repeated to HQ heads outside the timed region (backend has no GQA);
          "fold"    decode only: the G query heads of a KV group become G query rows of one
                    head (exact, since one decode query sees the whole cache, no mask).
    """
    g = hq // hkv
    need_grad = op in ("backward", "forward_backward")
    causal = op != "decode"
    tq = 1 if op == "decode" else t
    fns = []
    for _ in range(n_sets):
        if mode == "fold":
            q = randn((b, hkv, g, dk), dtype, device, need_grad)
        else:
            q = randn((b, hq, tq, dk), dtype, device, need_grad)
        if mode == "expand":
            k = randn((b, hkv, t, dk), dtype, device).repeat_interleave(g, dim=1).requires_grad_(need_grad)
            v = randn((b, hkv, t, dv), dtype, device).repeat_interleave(g, dim=1).requires_grad_(need_grad)
        else:
            k = randn((b, hkv, t, dk), dtype, device, need_grad)
            v = randn((b, hkv, t, dv), dtype, device, need_grad)
        gqa = mode == "native" and g > 1

        def call(q=q, k=k, v=v, gqa=gqa):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        out_shape = (q.shape[0], q.shape[1], q.shape[2], dv)
        fns.append(wrap_op(op, call, (q, k, v), out_shape))
    return fns


def dense_set_bytes(op, b, hq, hkv, t, dk, dv, elem):
    tq = 1 if op == "decode" else t
    qo = b * hq * tq * (dk + dv)
    kv = b * hkv * t * (dk + dv)
    extra = b * hq * tq * dv if op in ("backward", "forward_backward") else 0  # do
    return elem * (qo + kv + extra)


def fla_sets(parallel_nsa, op, b, hq, hkv, t, dk, dv, dtype, device, n_sets, block, topk):
    """Input sets for fla's parallel_nsa in its B,T,H,D layout, window branch off."""
    need_grad = op in ("backward", "forward_backward")
    tq = 1 if op == "decode" else t
    fns = []
    for _ in range(n_sets):
        q = randn((b, tq, hq, dk), dtype, device, need_grad)
        k = randn((b, t, hkv, dk), dtype, device, need_grad)
        v = randn((b, t, hkv, dv), dtype, device, need_grad)
        g_cmp = gates((b, tq, hq), dtype, device, need_grad)
        g_slc = gates((b, tq, hq), dtype, device, need_grad)

        def call(q=q, k=k, v=v, g_cmp=g_cmp, g_slc=g_slc):
            return parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=topk,
                                block_size=block, window_size=0)

        fns.append(wrap_op(op, call, (q, k, v, g_cmp, g_slc), (b, tq, hq, dv)))
    return fns


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.records = []
        self.checks = {}
        self.parallel_nsa = None
        self.fla_version = None
        self.device = args.device
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        self.timer = None
        self.machine = None
        self.driver = None
        self.t0 = time.perf_counter()

    # -- setup ---------------------------------------------------------------------------------

    def setup(self):
        """Returns the impls that can run here, printing why others cannot."""
        a = self.args
        wanted = csv_strs(a.impls) or list(CUDA_IMPLS if self.device == "cuda" else CPU_IMPLS)
        if torch is None:
            skip("all", "PyTorch is not importable")
            return []
        if self.device == "cuda":
            if not torch.cuda.is_available():
                skip("all", "--device cuda but torch sees no GPU")
                return []
            self.machine = torch.cuda.get_device_name(0)
            self.driver = gpu_driver()
            self.dtype = torch.bfloat16
            impls = []
            for impl in wanted:
                if impl in (IMPL_CUDNN, IMPL_FLASH):
                    try:
                        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
                    except ImportError as e:
                        skip(impl, f"torch.nn.attention.sdpa_kernel missing ({short(e)})")
                        continue
                    impls.append(impl)
                elif impl == IMPL_FLA:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            from fla.ops.nsa import parallel_nsa
                            import fla
                        self.parallel_nsa = parallel_nsa
                        self.fla_version = getattr(fla, "__version__", "?")
                        impls.append(impl)
                    except Exception as e:  # ImportError, or a broken install
                        skip(impl, f"fla not importable ({short(e)}); see bench/README.md for the wheels")
                else:
                    skip(impl, "not a CUDA impl")
        else:
            torch.set_num_threads(a.threads)
            self.machine = cpu_model()
            self.dtype = torch.float32
            impls = [i for i in wanted if i in CPU_IMPLS]
            for i in wanted:
                if i not in CPU_IMPLS:
                    skip(i, "not a CPU impl")
        self.timer = Timer(self.device, a.warmup_ms, a.rep_ms, a.min_reps, a.max_reps)
        self.software = software_versions(self.fla_version, self.device)
        log(f"# {self.date} {self.machine} ({self.device}; {self.software}"
            + (f"; driver {self.driver}" if self.driver else "")
            + (f"; threads {torch.get_num_threads()}" if self.device == "cpu" else "") + ")")
        return impls

    def backend_ctx(self, impl):
        if impl == IMPL_CUDNN:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        if impl == IMPL_FLASH:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        return contextlib.nullcontext()

    # -- one measurement -----------------------------------------------------------------------

    def measure(self, impl, op, b, hq, hkv, t, dk, dv, mode=None, variant=None, notes=()):
        """Build inputs, run the cold call, time, and append a record. Raises on failure."""
        a = self.args
        dev = self.device
        wall0 = time.perf_counter()
        elem = torch.tensor([], dtype=self.dtype).element_size()
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        set_bytes = dense_set_bytes(op, b, hq, hkv, t, dk, dv, elem)
        if mode == "expand":
            set_bytes += elem * b * (hq - hkv) * t * (dk + dv)
        n_sets = self.timer.n_sets(set_bytes)
        grad_ctx = torch.no_grad() if op in ("forward", "decode") else contextlib.nullcontext()
        notes = list(notes)
        use_graph = False
        with self.backend_ctx(impl), grad_ctx:
            if impl == IMPL_FLA:
                fns = fla_sets(self.parallel_nsa, op, b, hq, hkv, t, dk, dv, self.dtype, dev, n_sets,
                               a.fla_block, a.fla_topk)
            else:
                fns = dense_sets(op, mode or "native", b, hq, hkv, t, dk, dv, self.dtype, dev, n_sets)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = fns[0]()  # cold: compilation, autotuning, plans
                    if dev == "cuda":
                        torch.cuda.synchronize()
                except RuntimeError as e:
                    if not is_oom(e) and "no available kernel" in str(e).lower():
                        raise Skip(f"backend refused ({refusal_reason(caught, e)})") from None
                    raise
            finite = all_finite(out)
            del out
            for fn in fns[1:]:
                fn()
            if op == "decode" and dev == "cuda" and not a.decode_eager:
                try:
                    fns = capture_graphs(fns)
                    use_graph = True
                except Exception as e:  # capture unsupported: time eagerly and say so
                    torch.cuda.synchronize()
                    notes.append(f"CUDA graph capture failed ({short(e, 120)}), timed eagerly")
            med, best, reps = self.timer.run(fns)
        peak = None
        if dev == "cuda":
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / GIB
        del fns
        free_memory()

        flops = op_flops(op, b, hq, t, dk, dv)
        rec = {
            "date": self.date,
            "machine": self.machine,
            "device": dev,
            "driver": self.driver,
            "software": self.software,
            "op": op,
            "impl": impl,
            "batch": b,
            "T": t,
            "heads": hq,
            "kv_heads": hkv,
            "dk": dk,
            "dv": dv,
            "dtype": str(self.dtype).replace("torch.", ""),
            "causal": op != "decode",
            "threads": torch.get_num_threads() if dev == "cpu" else None,
            "ms": round(med, 6),
            "ms_min": round(best, 6),
            "reps": reps,
            "input_sets": n_sets,
            "tflops": round(flops / (med * 1e-3) / 1e12, 3) if flops else None,
            "gbps": None,
            "bytes": None,
            "peak_mem_gib": round(peak, 4) if peak is not None else None,
            "finite": finite,
            "wall_s": round(time.perf_counter() - wall0, 2),
        }
        if variant:
            rec["variant"] = variant
        if op == "decode":
            nbytes = decode_bytes(b, hq, hkv, t, dk, dv, elem)
            rec["bytes"] = nbytes
            rec["gbps"] = round(nbytes / (med * 1e-3) / 1e9, 2)
            rec["cuda_graph"] = use_graph if dev == "cuda" else None
            rec["tflops"] = None
        if impl == IMPL_FLA:
            rec["config"] = {"cmp_block": a.fla_block, "cmp_stride": a.fla_block, "sel_block": a.fla_block,
                             "sel_count": a.fla_topk, "init_blocks": 1, "local_blocks": 2, "window": 0,
                             "phi": "mean"}
            notes.append(
                f"fla {self.fla_version} parallel_nsa: mean-pool compression with l=d=l'={a.fla_block} "
                f"(paper l=32,d=16,l'=64), top-{a.fla_topk} incl. forced first + last 2 blocks, "
                "window branch off (needs flash_attn; paper w=512), random gate values in (0,1); "
                "dense_equiv_tflops counts dense causal flops over its time (not its own flop rate)")
            rec["dense_equiv_tflops"], rec["tflops"] = rec["tflops"], None
            if op == "decode":
                notes.append("bytes = whole K/V cache (fla re-pools the whole cache every step)")
        key = (impl, dk, dv)
        if key in self.checks:
            rec["check_rel_err"] = self.checks[key]
        if not finite:
            notes.append("NON-FINITE OUTPUT")
            log(f"WARNING {impl} {op} T={t}: output not finite")
        if notes:
            rec["note"] = "; ".join(notes)
        self.records.append(rec)
        self.write()
        self.print_row(rec)
        return rec

    def attempt(self, what, impl, op, b, hq, hkv, t, dk, dv, modes, variant_names=False):
        """Try the modes in order until one runs (or measure all for decode variants)."""
        reasons = []
        for mode, note in modes:
            try:
                self.measure(impl, op, b, hq, hkv, t, dk, dv, mode=mode,
                             variant=(mode if variant_names else None),
                             notes=([note] if note else []))
                if not variant_names:
                    return
                continue
            except Skip as e:
                reasons.append(f"[{mode}] {e}")
            except Exception as e:
                if is_oom(e):
                    reasons.append(f"[{mode}] out of memory")
                    free_memory()
                    break  # another mode only needs more memory
                reasons.append(f"[{mode}] {short(e)}")
                if self.args.verbose:
                    traceback.print_exc()
            free_memory()
        if reasons:
            skip(what, " | ".join(reasons))

    def run_case(self, impl, op, b, hq, hkv, t, dk, dv):
        g = hq // hkv
        what = f"{impl} {op} B={b} T={t} HQ={hq} HKV={hkv} dk={dk} dv={dv}"
        if self.args.budget_s and time.perf_counter() - self.t0 > self.args.budget_s:
            skip(what, f"--budget-s {self.args.budget_s:g} spent")
            return
        if impl == IMPL_FLA:
            if g < 16 or (g & (g - 1)) != 0:
                skip(what, f"fla parallel_nsa needs HQ/HKV a power of 2 >= 16 (G={g})")
                return
            self.attempt(what, impl, op, b, hq, hkv, t, dk, dv, [(None, None)])
            return
        if g == 1:
            modes = [("native", None)]
        elif op == "decode":
            # both: enable_gqa as the library offers it, and the exact fold of a group's heads
            # into query rows that decoders use; the table keeps both (field "variant").
            modes = [("native", "GQA via enable_gqa=True"),
                     ("fold", "GQA folded: the G query heads of a KV group are G query rows")]
            self.attempt(what, impl, op, b, hq, hkv, t, dk, dv, modes, variant_names=True)
            return
        else:
            modes = [("native", "GQA via enable_gqa=True"),
                     ("expand", "backend has no GQA: K/V repeated to HQ heads outside the timed "
                                "region (kernel reads G x the K/V bytes; dK/dV left per query head)")]
        self.attempt(what, impl, op, b, hq, hkv, t, dk, dv, modes)

    # -- correctness ---------------------------------------------------------------------------

    def check_dense(self, impl, hq, hkv, dk, dv, t):
        """Forward vs a float64/float32 reference on small random inputs; stores rel. RMS error."""
        dev = self.device
        g = hq // hkv
        ref_dtype = torch.float64 if dev == "cpu" else torch.float32
        q = torch.randn(1, hq, t, dk, device=dev, dtype=self.dtype)
        k = torch.randn(1, hkv, t, dk, device=dev, dtype=self.dtype)
        v = torch.randn(1, hkv, t, dv, device=dev, dtype=self.dtype)
        ke = k.to(ref_dtype).repeat_interleave(g, dim=1)
        ve = v.to(ref_dtype).repeat_interleave(g, dim=1)
        s = (q.to(ref_dtype) @ ke.transpose(-1, -2)) / math.sqrt(dk)
        mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        ref = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ ve
        del s
        out = None
        with self.backend_ctx(impl), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for gqa in ((True, False) if g > 1 else (False,)):
                try:
                    kk, vv = (k, v) if gqa or g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
                    out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                    break
                except RuntimeError as e:
                    if is_oom(e):
                        raise
        if out is None:
            log(f"CHECK {impl} dk={dk} dv={dv}: backend refused the shape")
            return
        err = ((out.to(ref_dtype) - ref).norm() / ref.norm()).item()
        ok = math.isfinite(err) and err < (1e-2 if self.dtype != torch.float32 else 1e-4)
        self.checks[(impl, dk, dv)] = round(err, 7)
        log(f"CHECK {impl} T={t} HQ={hq} HKV={hkv} dk={dk} dv={dv}: rel err {err:.2e} "
            f"vs {str(ref_dtype).replace('torch.', '')} reference: {'ok' if ok else 'FAILED'}")

    # -- output --------------------------------------------------------------------------------

    def write(self):
        path = self.args.out
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.records, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    HEADER = (f"{'impl':<17} {'op':<16} {'var':<6} {'B':>3} {'T':>7} {'HQ/KV':>6} {'dk/dv':>7} "
              f"{'ms':>10} {'TFLOP/s':>8} {'GB/s':>7} {'GiB':>6}")

    def fmt(self, r):
        var = {"native": "gqa", "fold": "fold"}.get(r.get("variant"), "")
        if r.get("note", "").startswith("backend has no GQA"):
            var = "expand"
        tf = "-" if r["tflops"] is None else (f"{r['tflops']:.1f}" if r["tflops"] >= 10 else f"{r['tflops']:.3f}")
        gb = f"{r['gbps']:.0f}" if r["gbps"] is not None else "-"
        pk = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        impl = r["impl"] + (f"@{r['threads']}" if r["threads"] else "")
        return (f"{impl:<17} {r['op']:<16} {var:<6} {r['batch']:>3} {r['T']:>7} "
                f"{str(r['heads']) + '/' + str(r['kv_heads']):>6} {str(r['dk']) + '/' + str(r['dv']):>7} "
                f"{r['ms']:>10.4f} {tf:>8} {gb:>7} {pk:>6}")

    def print_row(self, r):
        log(self.fmt(r))

    def print_table(self):
        log("")
        log(f"wall time in measurements: {sum(r['wall_s'] for r in self.records):.1f} s "
            f"(whole run {time.perf_counter() - self.t0:.1f} s)")
        log(f"== peers: {len(self.records)} records, {self.machine}, {self.date} ==")
        log(self.HEADER)
        for r in self.records:
            log(self.fmt(r))

    # -- sweeps --------------------------------------------------------------------------------

    def run(self):
        a = self.args
        impls = self.setup()
        ops = csv_strs(a.op)
        allowed = OPS_CUDA if self.device == "cuda" else OPS_CPU
        for op in ops:
            if op not in allowed:
                skip(op, f"not an op for --device {self.device} (choose from {','.join(allowed)})")
        ops = [op for op in ops if op in allowed]
        if not impls or not ops:
            self.write()
            return
        log(self.HEADER)
        if self.device == "cuda":
            self.run_cuda(impls, ops)
        else:
            self.run_cpu(impls, ops)
        self.write()
        self.print_table()

    def shapes_cuda(self):
        a = self.args
        return [(a.heads, a.kv_heads, dk, dv) for dk, dv in parse_dims(a.head_dims)]

    def run_cuda(self, impls, ops):
        a = self.args
        dense = [i for i in impls if i != IMPL_FLA]
        if not a.no_check:
            for impl in dense:
                for hq, hkv, dk, dv in self.shapes_cuda():
                    try:
                        self.check_dense(impl, hq, hkv, dk, dv, a.check_len)
                    except Exception as e:
                        skip(f"check {impl} dk={dk} dv={dv}", short(e))
                    free_memory()
        for op in ops:
            lengths = csv_ints(a.decode_lengths) if op == "decode" else csv_ints(a.lengths)
            batches = csv_ints(a.decode_batches) if op == "decode" else [a.batch]
            for hq, hkv, dk, dv in self.shapes_cuda():
                for b in batches:
                    for t in lengths:
                        for impl in impls:
                            self.run_case(impl, op, b, hq, hkv, t, dk, dv)
            # GQA group sweep for the dense baselines: HQ fixed, HKV = HQ / G.
            if op != "decode" and a.gqa_groups and a.gqa_len:
                if IMPL_FLA in impls:
                    log(f"NOTE {IMPL_FLA} is not in the G sweep: parallel_nsa needs G a power of 2 >= 16")
                for g in csv_ints(a.gqa_groups):
                    if a.heads % g:
                        skip(f"G={g}", f"does not divide HQ={a.heads}")
                        continue
                    for impl in dense:
                        self.run_case(impl, op, a.batch, a.heads, a.heads // g, a.gqa_len, 128, 128)

    def run_cpu(self, impls, ops):
        a = self.args
        shapes = parse_cpu_shapes(a.cpu_shapes)
        if not a.no_check:
            for hq, hkv, dk, dv in shapes:
                try:
                    self.check_dense(IMPL_CPU, hq, hkv, dk, dv, min(a.check_len, 512))
                except Exception as e:
                    skip(f"check {IMPL_CPU} dk={dk} dv={dv}", short(e))
        for op in ops:
            lengths = csv_ints(a.decode_lengths) if op == "decode" else csv_ints(a.lengths)
            batches = csv_ints(a.decode_batches) if op == "decode" else [a.batch]
            for hq, hkv, dk, dv in shapes:
                for b in batches:
                    for t in lengths:
                        for impl in impls:
                            self.run_case(impl, op, b, hq, hkv, t, dk, dv)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--op", default="forward,backward",
                   help="comma list of forward,backward,forward_backward,decode")
    p.add_argument("--impls", default="",
                   help=f"comma list; default all for the device: {','.join(CUDA_IMPLS)} | {IMPL_CPU}")
    p.add_argument("--lengths", default=None,
                   help="prefill lengths T (default cuda 8192..131072, cpu 2048..32768)")
    p.add_argument("--decode-lengths", default=None,
                   help="decode context lengths (default cuda 8192..131072, cpu 8192..65536)")
    p.add_argument("--decode-batches", default=None, help="decode batch sizes (default cuda 1,32; cpu 1)")
    p.add_argument("--batch", type=int, default=1, help="prefill batch size")
    p.add_argument("--heads", type=int, default=64, help="CUDA: query heads HQ")
    p.add_argument("--kv-heads", type=int, default=4, help="CUDA: KV heads HKV")
    p.add_argument("--head-dims", default="128:128,192:128", help="CUDA: dk:dv pairs")
    p.add_argument("--gqa-groups", default="1,2,4,8",
                   help="CUDA dense only: G values (HKV = HQ/G) measured at --gqa-len; empty disables")
    p.add_argument("--gqa-len", type=int, default=65536)
    p.add_argument("--cpu-shapes", default="16:1:64:64,32:2:128:128", help="CPU: HQ:HKV:dk:dv list")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU: torch.set_num_threads")
    p.add_argument("--fla-block", type=int, default=64, help="fla block_size (l = d = l')")
    p.add_argument("--fla-topk", type=int, default=16, help="fla block_counts (selected blocks n)")
    p.add_argument("--warmup-ms", type=float, default=50.0)
    p.add_argument("--rep-ms", type=float, default=300.0, help="aim for this much timed work per point")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=100)
    p.add_argument("--decode-eager", action="store_true", help="time decode without CUDA graphs")
    p.add_argument("--check-len", type=int, default=1024, help="T of the correctness check")
    p.add_argument("--no-check", action="store_true", help="skip the dense correctness check")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="start no new measurement after this many seconds (0: no limit)")
    p.add_argument("--out", default=None, help="JSON output path (a list of records)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed measurements")
    a = p.parse_args(argv)
    if a.lengths is None:
        a.lengths = "8192,16384,32768,65536,131072" if a.device == "cuda" else "2048,4096,8192,16384,32768"
    if a.decode_lengths is None:
        a.decode_lengths = "8192,16384,32768,65536,131072" if a.device == "cuda" else "8192,16384,32768,65536"
    if a.decode_batches is None:
        a.decode_batches = "1,32" if a.device == "cuda" else "1"
    return a


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
