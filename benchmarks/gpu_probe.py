#!/usr/bin/env python3
"""Decode-speed probe for the reversible "fast path" (bf16 / bnb nf4 / fp4 / int8), batch 1 and 8.

Runs one *phase* per process (so a crash or hang in one variant costs only that phase) and appends one
JSON line per measured variant to OUT/results.jsonl; `--phase report` prints the table.

    # local logic check (CPU, tiny config, no CUDA graphs, compile via backend="eager")
    python benchmarks/gpu_probe.py --device cpu --tiny --phase all
    # on the GPU: benchmarks/gpu_probe_run.sh holds the exact plans that produced benchmarks/NOTES_gpu.md, e.g.
    python benchmarks/gpu_probe.py --out $OUT --phase env
    python benchmarks/gpu_probe.py --out $OUT --phase run --target nf4 --steps plain,profile,graph,graphc,graphcd
    python benchmarks/gpu_probe.py --out $OUT --phase small --small-dtypes fp32,bf16 --small-methods graph,graphc
    python benchmarks/gpu_probe.py --out $OUT --phase report

Model: Llama-3-8B-shaped LlamaForCausalLM with random weights built directly on the device (decode speed does not
depend on values). Quantized variants are produced by `from_pretrained(None, config=..., state_dict=<bf16 weights>,
quantization_config=BitsAndBytesConfig(...))`, i.e. the same quantize-on-load path the app uses, without a disk
round trip. Four hidden dims get RMSNorm weight 8.0 so that LLM.int8()'s outlier decomposition (|x| >= 6) really
runs, as it does for real checkpoints.

Fast-path methods measured (none of them touches weights or the module tree; each is undone by deleting instance
attributes / restoring the attention implementation):
  plain            model.generate(...) as is (DynamicCache)
  hf-static        generate(cache_implementation="static", disable_compile=True)
  hf-autocompile   generate(cache_implementation="static", compile_config=CompileConfig(...)) -> transformers compiles
                   the decode step itself (torch.compile(model.__call__, mode="reduce-overhead")). For bnb models the
                   quantizer says is_compileable=False, so `force` adds an instance-level override of
                   `_valid_auto_compile_criteria`.
  graph            GraphedDecode below: a StaticCache owned by the wrapper + one manually captured CUDA graph of the
                   decode forward (eager kernels), plugged into model.generate through two instance attributes
                   (`_valid_auto_compile_criteria`, `get_compiled_call`).
  graph+compile    same, but the captured forward is torch.compile(model, mode="default") (Inductor fusion, no
                   Inductor cudagraphs: the manual graph removes the launch overhead).
  raw              the same graph driven by a bare device-side greedy loop (argmax + position/mask update inside the
                   graph): pure GPU time per step, i.e. what generate() would give with zero host overhead.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
import types

import torch

T0 = time.time()
ARGS = None
OUTDIR = None


# ----------------------------------------------------------------------------------------------------------------- utils
def log(*a):
    msg = " ".join(str(x) for x in a)
    line = f"[{time.time() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    if OUTDIR:
        with open(os.path.join(OUTDIR, "log.txt"), "a") as f:
            f.write(line + "\n")


def remaining():
    if ARGS.deadline:
        return ARGS.deadline - time.time()
    return 1e9


def have_time(need_s, what):
    r = remaining()
    if r < need_s:
        log(f"SKIP {what}: needs ~{need_s:.0f}s, {r:.0f}s left")
        record(dict(variant=what, skipped=f"time ({r:.0f}s left, needs ~{need_s:.0f}s)"))
        return False
    return True


def record(row):
    row = dict(row)
    row.setdefault("phase", ARGS.phase)
    row["t"] = round(time.time() - T0, 1)
    if OUTDIR:
        with open(os.path.join(OUTDIR, "results.jsonl"), "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    short = {k: v for k, v in row.items() if k not in ("tokens", "top_kernels", "step_ms")}
    log("RESULT", json.dumps(short, default=str))


def is_cuda():
    return ARGS.device == "cuda"


def sync():
    if is_cuda():
        torch.cuda.synchronize()


def cleanup():
    gc.collect()
    if is_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def mem_gb():
    if not is_cuda():
        return 0.0
    return round(torch.cuda.memory_allocated() / 2**30, 2)


# --------------------------------------------------------------------------------------------------------------- configs
OUTLIER_DIMS = [17, 1033, 2222, 3801]
OUTLIER_SCALE = 8.0


def make_config(name):
    from transformers import LlamaConfig

    if name == "8b":
        kw = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    elif name == "small":  # SmolLM2-135M shape
        kw = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    elif name == "tiny8b":  # CPU stand-in for the 8B model
        kw = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    elif name == "tinysmall":
        kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    else:
        raise ValueError(name)
    return LlamaConfig(**kw)


def big_name():
    return "tiny8b" if ARGS.tiny else "8b"


def small_name():
    return "tinysmall" if ARGS.tiny else "small"


def build_base(cfg, dtype, seed=1234, outliers=True, logit_scale=None):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if is_cuda():
        torch.cuda.manual_seed_all(seed)
    t = time.time()
    with torch.device(ARGS.device):
        m = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    m.eval()
    m.requires_grad_(False)
    with torch.no_grad():
        if outliers:
            dims = [d % cfg.hidden_size for d in OUTLIER_DIMS]
            for layer in m.model.layers:
                layer.input_layernorm.weight[dims] = OUTLIER_SCALE
                layer.post_attention_layernorm.weight[dims] = OUTLIER_SCALE
        if logit_scale is not None:  # sharper next-token distribution ("real-ish" greedy behaviour)
            m.model.norm.weight.mul_(logit_scale)
    sync()
    log(f"built {cfg.num_hidden_layers}L h{cfg.hidden_size} {dtype} in {time.time() - t:.1f}s, mem {mem_gb()} GB")
    return m


def quant_config(kind, compute_dtype, threshold=6.0, double_quant=False):
    from transformers import BitsAndBytesConfig

    if kind in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=double_quant)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    raise ValueError(kind)


def load_quant(base, qc):
    from transformers import LlamaForCausalLM

    t = time.time()
    sd = dict(base.state_dict())
    dm = {"": 0} if is_cuda() else {"": "cpu"}
    q = LlamaForCausalLM.from_pretrained(None, config=base.config, state_dict=sd, quantization_config=qc,
                                         dtype=base.dtype, device_map=dm, attn_implementation="sdpa")
    del sd
    q.eval()
    if not is_cuda():  # keep the CPU path on bnb's generic gemm_4bit op (what CUDA runs), not the AVX512 repack
        for mod in q.modules():
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
    sync()
    log(f"quantized ({qc.quantization_method()}) in {time.time() - t:.1f}s, mem {mem_gb()} GB")
    return q


def step_bytes(model):
    """Bytes that one decode step must read: every weight except the input embedding (one row is gathered)."""
    import torch.nn as nn

    total = 0
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            continue
        for p in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            total += p.numel() * p.element_size()
        w = getattr(mod, "weight", None)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                for t in (s2.absmax, s2.code):
                    total += t.numel() * t.element_size()
        st = getattr(mod, "state", None)
        scb = getattr(w, "SCB", None)
        if scb is None and st is not None:
            scb = getattr(st, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


# -------------------------------------------------------------------------------------------------------------- timing
class StepTimer:
    """LogitsProcessor that time-stamps every generation step without adding a host sync (CUDA events)."""

    def __init__(self):
        self.marks = []

    def mark(self):
        if is_cuda():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def times_ms(self):
        """ms since marks[0] for every mark."""
        if is_cuda():
            return [self.marks[0].elapsed_time(e) for e in self.marks]
        return [(m - self.marks[0]) * 1e3 for m in self.marks]


def gen_kwargs(cfg, n_new):
    return dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.eos_token_id)


def timed_generate(gen_fn, ids, cfg, n_new, extra):
    from transformers import LogitsProcessorList

    timer = StepTimer()
    sync()
    t0 = time.perf_counter()
    timer.mark()  # mark 0 = start
    out = gen_fn(ids, logits_processor=LogitsProcessorList([timer]), **gen_kwargs(cfg, n_new), **extra)
    sync()
    wall = time.perf_counter() - t0
    ts = timer.times_ms()  # [start, after-prefill, step1, ...]
    ttft = ts[1]
    steps = [b - a for a, b in zip(ts[1:-1], ts[2:])]
    dec_s = (ts[-1] - ts[1]) / 1e3
    n_dec = len(ts) - 2
    return out, dict(wall_s=wall, ttft_ms=ttft, decode_tok_s=(n_dec / dec_s) if dec_s > 0 else float("nan"),
                     step_ms=steps, n_new=out.shape[1] - ids.shape[1])


def summarize_runs(runs):
    tps = [r["decode_tok_s"] for r in runs]
    allsteps = [s for r in runs for s in r["step_ms"]]
    return dict(decode_tok_s=round(statistics.median(tps), 2), decode_tok_s_runs=[round(x, 2) for x in tps],
                ttft_ms=round(statistics.median([r["ttft_ms"] for r in runs]), 2),
                step_ms_med=round(statistics.median(allsteps), 3) if allsteps else None,
                step_ms_max=round(max(allsteps), 3) if allsteps else None,
                wall_s=round(statistics.median([r["wall_s"] for r in runs]), 3))


def bench_generate(gen_fn, ids, cfg, n_new, extra=None, warm_new=None, runs=2, slow_s=6.0):
    """warm-up call (reported as first_call_s: includes compile / graph capture), then timed calls."""
    extra = extra or {}
    t = time.perf_counter()
    gen_fn_w = gen_fn
    warm_new = warm_new or n_new
    with torch.no_grad():
        out, first = timed_generate(gen_fn_w, ids, cfg, warm_new, extra)
    first_s = time.perf_counter() - t
    res = []
    if warm_new == n_new and first["decode_tok_s"] < 4 and first["step_ms"] and \
            statistics.median(first["step_ms"]) > 200:  # pathological (e.g. recompiling every step): don't repeat
        runs = 0
        res = [first]
    if ARGS.runs_always:
        runs = ARGS.runs_always
    for i in range(runs):
        out, r = timed_generate(gen_fn, ids, cfg, n_new, extra)
        res.append(r)
        if r["wall_s"] > slow_s and not ARGS.runs_always:  # slow variant: one timed run is enough
            break
    s = summarize_runs(res)
    s["first_call_s"] = round(first_s, 2)
    s["first_decode_tok_s"] = round(first["decode_tok_s"], 2)
    return out, s


# ------------------------------------------------------------------------------------------------ fast-path machinery
class GraphedDecode:
    """Reversible decode fast path: one StaticCache owned by this object, the decode forward captured once in a CUDA
    graph (optionally of a torch.compile'd forward), and model.generate routed to it through two instance attributes.

        gd = GraphedDecode(model, max_cache_len=prompt+new, compile_mode=None | "default")
        gd.install();  out = gd.generate(ids, max_new_tokens=...);  gd.uninstall()

    Nothing in model.state_dict() or the module tree changes; uninstall() deletes the two instance attributes.
    The graph is keyed by (batch, mask shape/dtype); a new batch size allocates a new cache and captures again.
    """

    def __init__(self, model, max_cache_len, compile_mode=None, use_graph=True, fullgraph=True, compile_backend=None):
        self.model = model
        self.max_cache_len = max_cache_len
        self.use_graph = use_graph and is_cuda()
        self.caches = {}
        self.graphs = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graph else None
        self.fwd = model
        self.compile_mode = compile_mode
        if compile_mode is not None:
            kw = dict(fullgraph=fullgraph, dynamic=False)
            if compile_backend:
                kw["backend"] = compile_backend
            else:
                kw["mode"] = compile_mode
            self.fwd = torch.compile(model, **kw)  # returns a wrapper; `model` itself is not modified
        self.capture_s = []
        self.tag = ""

    # -- install / uninstall -----------------------------------------------------------------------------------
    def install(self):
        m = self.model
        m._valid_auto_compile_criteria = lambda model_kwargs, generation_config: (
            model_kwargs.get("cache") is not None and any(model_kwargs.get("cache") is c for c in self.caches.values()))
        m.get_compiled_call = lambda compile_config=None: self.step
        return self

    def uninstall(self):
        for a in ("_valid_auto_compile_criteria", "get_compiled_call"):
            self.model.__dict__.pop(a, None)

    def release(self):
        self.uninstall()
        self.graphs.clear()
        self.caches.clear()
        self.fwd = None

    # -- cache ---------------------------------------------------------------------------------------------------
    def cache_for(self, batch):
        from transformers import StaticCache

        c = self.caches.get(batch)
        if c is None:
            c = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
            self.caches[batch] = c
        else:
            c.reset()  # in place: keeps the tensor addresses the graph captured
        return c

    def generate(self, input_ids, **kw):
        cache = self.cache_for(input_ids.shape[0])
        return self.model.generate(input_ids, cache=cache, **kw)

    # -- the decode step -----------------------------------------------------------------------------------------
    def _split(self, inputs):
        inputs = dict(inputs)
        inputs.pop("return_dict", None)
        ids = inputs.pop("input_ids")
        pos = inputs.pop("position_ids", None)
        mask = inputs.pop("attention_mask", None)
        cache = inputs.pop("cache")
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                raise RuntimeError(f"GraphedDecode: unsupported tensor input {k}")
        return ids, pos, mask, cache, inputs

    def step(self, **inputs):
        ids, pos, mask, cache, other = self._split(inputs)
        if not self.use_graph:
            kw = dict(input_ids=ids, cache=cache, **other)
            if pos is not None:
                kw["position_ids"] = pos
            if mask is not None:
                kw["attention_mask"] = mask
            return self.fwd(**kw)
        key = ("gen", id(cache), tuple(ids.shape), None if pos is None else tuple(pos.shape),
               None if mask is None else (tuple(mask.shape), mask.dtype), tuple(sorted(other.items())))
        st = self.graphs.get(key)
        if st is None:
            st = self._capture(cache, ids, pos, mask, other)
            self.graphs[key] = st
        st.ids.copy_(ids)
        if pos is not None:
            st.pos.copy_(pos)
        if mask is not None:
            st.mask.copy_(mask)
        st.graph.replay()
        return st.out

    def _kw(self, st, cache, other):
        kw = dict(input_ids=st.ids, cache=cache, **other)
        if st.pos is not None:
            kw["position_ids"] = st.pos
        if st.mask is not None:
            kw["attention_mask"] = st.mask
        return kw

    def _capture(self, cache, ids, pos, mask, other, body=None, warmup=2):
        t = time.perf_counter()
        st = types.SimpleNamespace()
        st.ids = ids.clone()
        st.pos = None if pos is None else pos.clone()
        st.mask = None if mask is None else mask.clone()
        kw = self._kw(st, cache, other)
        lens = [layer.cumulative_length.clone() for layer in cache.layers]

        def restore():
            for layer, v in zip(cache.layers, lens):
                layer.cumulative_length.copy_(v)

        run = body if body is not None else (lambda: self.fwd(**kw))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):  # compiles (if compile_mode) and warms cuBLAS/bnb; state restored after each
                run()
                restore()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            st.out = run()
        st.graph = g
        torch.cuda.synchronize()
        self.capture_s.append(time.perf_counter() - t)
        return st

    # -- bare device-side greedy loop (pure GPU time per step) -----------------------------------------------------
    def raw_decode(self, input_ids, n_new, attn_impl):
        """prefill eagerly, then n_new-1 graph replays; argmax, position and mask update live inside the graph."""
        B, P = input_ids.shape
        cache = self.cache_for(B)
        L = self.max_cache_len
        dev = input_ids.device
        with torch.no_grad():
            out = self.model(input_ids=input_ids, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            dtype = self.model.dtype
            kv = torch.arange(L, device=dev)
            pos = torch.full((B, 1), P, dtype=torch.long, device=dev)

            def mask_for(p):
                allowed = (kv[None, None, None, :] <= p[:, :, None, None]).expand(B, 1, 1, L)
                if attn_impl == "eager":
                    return torch.where(allowed, torch.zeros((), dtype=dtype, device=dev),
                                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=dev))
                return allowed.contiguous()

            key = ("raw", id(cache), B)
            st = self.graphs.get(key)
            if st is None:
                st = types.SimpleNamespace(ids=tok.clone(), pos=pos.clone(), mask=mask_for(pos))
                kw = dict(input_ids=st.ids, position_ids=st.pos, attention_mask=st.mask, cache=cache, use_cache=True,
                          logits_to_keep=1)

                def body():
                    o = self.fwd(**kw)
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                    st.ids.copy_(nxt)
                    st.pos.add_(1)
                    st.mask.copy_(mask_for(st.pos))
                    return o

                # _capture clones ids/pos/mask; reuse its buffers by capturing with our own namespace instead
                t = time.perf_counter()
                lens = [layer.cumulative_length.clone() for layer in cache.layers]
                snap = (st.ids.clone(), st.pos.clone(), st.mask.clone())

                def restore():
                    for layer, v in zip(cache.layers, lens):
                        layer.cumulative_length.copy_(v)
                    st.ids.copy_(snap[0])
                    st.pos.copy_(snap[1])
                    st.mask.copy_(snap[2])

                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        body()
                        restore()
                torch.cuda.current_stream().wait_stream(s)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    body()
                st.graph = g
                torch.cuda.synchronize()
                self.capture_s.append(time.perf_counter() - t)
                self.graphs[key] = st
            else:
                st.ids.copy_(tok)
                st.pos.copy_(pos)
                st.mask.copy_(mask_for(pos))
            toks = [tok]
            torch.cuda.synchronize()
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(n_new - 1):
                st.graph.replay()
                toks.append(st.ids.clone())
            e1.record()
            torch.cuda.synchronize()
            ms = e0.elapsed_time(e1)
            extra = {}
            room = L - (P + n_new - 1)
            if ARGS.profile_graph and room >= 4:
                extra = kernel_summary(lambda: st.graph.replay(), min(room - 1, 5), f"graph-replay {self.tag}")
        seq = torch.cat([input_ids] + toks, dim=1)
        return seq, dict(raw_tok_s=round((n_new - 1) / (ms / 1e3), 2), raw_step_ms=round(ms / (n_new - 1), 3),
                         **extra)


class ForceAutoCompile:
    """Instance-level override so that transformers' own auto-compile (static cache + compile_config) also runs for
    bnb-quantized models (their quantizer reports is_compileable=False). Undo: uninstall()."""

    def __init__(self, model):
        self.model = model

    def install(self):
        from transformers import DynamicCache

        def crit(model_kwargs, generation_config):
            if generation_config.disable_compile:
                return False
            cache = model_kwargs.get("cache")
            return cache is not None and cache.is_compileable and type(cache) is not DynamicCache

        self.model._valid_auto_compile_criteria = crit
        return self

    def uninstall(self):
        self.model.__dict__.pop("_valid_auto_compile_criteria", None)


class DeferredStop:
    """Global, reversible patch: let generate() use its DeferredStopCheck (no per-step host sync) on CUDA too."""

    def __enter__(self):
        import transformers.generation.utils as gu

        self.gu = gu
        self.orig = gu.DeferredStopCheck.__dict__["is_supported"]

        def is_supported(device, cache, cache_is_returned, is_assistant):
            if is_assistant:
                return False
            return cache is None or cache.is_croppable or not cache_is_returned

        gu.DeferredStopCheck.is_supported = staticmethod(is_supported)
        return self

    def __exit__(self, *a):
        self.gu.DeferredStopCheck.is_supported = self.orig


class NoCudnnSdpa:
    """Global, reversible: keep F.scaled_dot_product_attention off the cuDNN backend (flash / mem-efficient used)."""

    def __enter__(self):
        self.prev = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        return self

    def __exit__(self, *a):
        torch.backends.cuda.enable_cudnn_sdp(self.prev)


class QuietBnbLogger:
    """bnb's MatMul8bitLt logs a WARNING on *every* call when inputs are not fp16 (bf16 models). Silence it."""

    def __enter__(self):
        self.lg = logging.getLogger("bitsandbytes.autograd._functions")
        self.level = self.lg.level
        self.lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *a):
        self.lg.setLevel(self.level)


# ---------------------------------------------------------------------------------------------------- correctness
def compare_tokens(model, ref, seq, prompt_len):
    """exact match? else first divergence and the reference model's logit gap there (tie analysis)."""
    if ref is None:
        return dict(match=None)
    ref = ref.to(seq.device)
    if ref.shape != seq.shape:
        return dict(match=False, note=f"shape {tuple(ref.shape)} vs {tuple(seq.shape)}")
    diff = (ref != seq)
    if not diff.any():
        return dict(match=True)
    rows = diff.any(1).nonzero().flatten().tolist()
    r = rows[0]
    i = int(diff[r].nonzero()[0])
    with torch.no_grad():
        logits = model(input_ids=ref[r:r + 1, :i]).logits[0, -1].float()
    a, b = int(ref[r, i]), int(seq[r, i])
    top2 = logits.topk(2).values
    return dict(match=False, rows_diverged=len(rows), first_div_row=r, first_div_step=i - prompt_len,
                gap_ref_minus_fast=round(float(logits[a] - logits[b]), 4),
                top1_minus_top2=round(float(top2[0] - top2[1]), 4),
                logit_scale=round(float(logits.std()), 3))


def ref_path(tag, batch):
    d = os.environ.get("PROBE_REFDIR", "/tmp/gpu_probe_refs")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"ref_tokens_{tag}_b{batch}.pt")


def save_ref(tag, batch, seq):
    torch.save(seq.cpu(), ref_path(tag, batch))


def load_ref(tag, batch):
    p = ref_path(tag, batch)
    return torch.load(p) if os.path.exists(p) else None


# ---------------------------------------------------------------------------------------------------- profiler
def profile_decode(model, ids, steps, label, extra_ctx=None):
    """Eager decode steps with a DynamicCache under torch.profiler: kernel time vs wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.cache
        tok = out.logits[:, -1:].argmax(-1)

        def one():
            nonlocal tok
            o = model(input_ids=tok, cache=cache, use_cache=True)
            tok = o.logits[:, -1:].argmax(-1)

        for _ in range(2):
            one()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            one()
        sync()
        wall_ms = (time.perf_counter() - t) / steps * 1e3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda() else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                one()
            sync()
    ka = prof.key_averages()
    kern, syncs, cpu_ops = [], 0, []
    for e in ka:
        dt = str(getattr(e, "device_type", ""))
        if dt.endswith("CUDA"):
            tt = getattr(e, "device_time_total", None)
            if tt is None:
                tt = getattr(e, "cuda_time_total", 0)
            kern.append((e.key, tt, e.count))
        else:
            if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense",
                         "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"):
                cpu_ops.append((e.key, e.count / steps))
    k_us = sum(t for _, t, _ in kern) / steps
    n_k = sum(c for _, _, c in kern) / steps
    top = sorted(kern, key=lambda x: -x[1])[:8]
    row = dict(variant="profile", label=label, wall_ms_per_step=round(wall_ms, 3),
               kernel_ms_per_step=round(k_us / 1e3, 3), kernels_per_step=round(n_k, 1),
               gpu_busy_pct=round(100 * k_us / 1e3 / wall_ms, 1) if wall_ms else None,
               host_calls_per_step={k: round(v, 1) for k, v in cpu_ops},
               top_kernels=[(k[:90], round(t / steps / 1e3, 3), round(c / steps, 1)) for k, t, c in top])
    if OUTDIR:
        with open(os.path.join(OUTDIR, "profiles.txt"), "a") as f:
            f.write(f"\n===== {label}: {steps} decode steps =====\n")
            f.write(ka.table(sort_by="self_cpu_time_total", row_limit=30))
            if is_cuda():
                f.write(ka.table(sort_by="self_device_time_total", row_limit=15))
    return row


def diag_plain(m, cfg, P, n=24):
    """Where does plain generate() spend host time? cProfile of generate + bare-forward timings."""
    import cProfile
    import io
    import pstats

    ids = prompts(cfg, 1, P)
    with torch.no_grad():
        m.generate(ids, **gen_kwargs(cfg, 4))
        pr = cProfile.Profile()
        sync()
        t = time.perf_counter()
        pr.enable()
        m.generate(ids, **gen_kwargs(cfg, n))
        sync()
        pr.disable()
        gen_ms = (time.perf_counter() - t) / n * 1e3
        st = pstats.Stats(pr)
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        top = sorted(((f"{k[0].split('/')[-1]}:{k[1]}({k[2]})", v[2], v[1]) for k, v in st.stats.items()),
                     key=lambda x: -x[1])[:10]
        # bare forward steps, with and without the extra kwargs generate passes
        out = m(input_ids=ids, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        am = torch.ones(1, P, dtype=torch.long, device=ids.device)
        res = {}
        for mode in ("bare", "mask+pos", "bare2"):
            sync()
            t = time.perf_counter()
            for i in range(8):
                kw = {}
                if mode == "mask+pos":
                    am = torch.cat([am, am.new_ones(1, 1)], -1)
                    kw = dict(attention_mask=am, position_ids=torch.tensor([[am.shape[1] - 1]], device=ids.device),
                              logits_to_keep=1)
                o = m(input_ids=tok, cache=cache, use_cache=True, **kw)
                tok = o.logits[:, -1:].argmax(-1)
            sync()
            res[mode] = round((time.perf_counter() - t) / 8 * 1e3, 2)
    if OUTDIR:
        with open(os.path.join(OUTDIR, "profiles.txt"), "a") as f:
            f.write(f"\n===== cProfile of plain generate ({n} new tokens, {gen_ms:.1f} ms/token) =====\n")
            f.write(buf.getvalue()[:6000])
    return dict(variant="diag-plain", gen_ms_per_token_cprofile=round(gen_ms, 2), fwd_ms=res,
                cprofile_top=[(a[:60], round(b, 3), c) for a, b, c in top])


def kernel_summary(fn, steps, label):
    """CUDA-only profile of `steps` calls of fn (e.g. graph replays): kernel ms per step and top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    kern = []
    for e in ka:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            tt = getattr(e, "device_time_total", None)
            kern.append((e.key, tt if tt is not None else getattr(e, "cuda_time_total", 0), e.count))
    top = sorted(kern, key=lambda x: -x[1])[:6]
    if OUTDIR:
        with open(os.path.join(OUTDIR, "profiles.txt"), "a") as f:
            f.write(f"\n===== {label}: {steps} steps (CUDA only) =====\n")
            f.write(ka.table(sort_by="self_device_time_total", row_limit=15))
    return dict(graph_kernel_ms=round(sum(t for _, t, _ in kern) / steps / 1e3, 3),
                graph_kernels=round(sum(c for _, _, c in kern) / steps, 1),
                graph_top=[(k[:70], round(t / steps / 1e3, 3), round(c / steps, 1)) for k, t, c in top])


# -------------------------------------------------------------------------------------------------------- runners
def prompts(cfg, batch, plen):
    g = torch.Generator().manual_seed(100 + batch)
    lo, hi = (1000, min(cfg.vocab_size, 100000)) if cfg.vocab_size > 2000 else (3, cfg.vocab_size)
    return torch.randint(lo, hi, (batch, plen), generator=g).to(ARGS.device)


class Ctx:
    """Per-model measurement context (bytes/step, roofline, reference tokens)."""

    def __init__(self, model, tag, bw):
        self.model = model
        self.tag = tag
        self.bytes = step_bytes(model)
        self.bw = bw
        self.roof = (bw / self.bytes) if bw else None

    def row(self, variant, batch, stats, seq=None, ref=None, prompt_len=None, **extra):
        row = dict(model=self.tag, variant=variant, batch=batch, **stats, **extra)
        row["GB_per_step"] = round(self.bytes / 1e9, 3)
        if self.roof:
            row["roofline_steps_s"] = round(self.roof, 1)
            best = max([v for v in (row.get("decode_tok_s"), row.get("raw_tok_s")) if v] or [0])
            row["pct_roofline_best"] = round(100 * best / self.roof, 1)
        if seq is not None:
            row.update({"tok_" + k: v for k, v in compare_tokens(self.model, ref, seq, prompt_len).items()})
        record(row)
        return row


def get_bw():
    if ARGS.bw:
        return ARGS.bw
    p = os.path.join(OUTDIR or "/tmp", "env.json")
    if os.path.exists(p):
        return json.load(open(p)).get("copy_bw_Bps")
    return None


def run_variant(name, fn):
    t = time.time()
    try:
        fn()
    except Exception as e:  # keep going; record the failure
        tb = traceback.format_exc()
        log(f"FAIL {name}: {type(e).__name__}: {e}\n{tb[-3000:]}")
        record(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:400]}"))
        try:
            if is_cuda():
                torch.cuda.synchronize()
        except Exception:
            log("CUDA context broken; exiting phase")
            sys.exit(3)
    finally:
        log(f"variant {name} took {time.time() - t:.1f}s")
        cleanup()


def measure_plain_family(ctx, cfg, batch, n_new, plen, ref_tag, attn="sdpa", label=None, extra_ctx=None,
                         save_as_ref=False):
    m = ctx.model
    ids = prompts(cfg, batch, plen)
    label = label or f"plain-{attn}"
    prev = m.config._attn_implementation
    if attn != prev:
        m.set_attn_implementation(attn)
    try:
        with (extra_ctx or _null()):
            seq, s = bench_generate(m.generate, ids, cfg, n_new, warm_new=8, runs=2)
    finally:
        if attn != prev:
            m.set_attn_implementation(prev)
    if save_as_ref:
        save_ref(ref_tag, batch, seq)
    ctx.row(label, batch, s, seq=seq, ref=None if save_as_ref else load_ref(ref_tag, batch), prompt_len=plen,
            attn=attn, is_ref=save_as_ref)
    return seq


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def measure_graph(ctx, cfg, batch, n_new, plen, ref_tag, compile_mode=None, attn="sdpa", raw=True,
                  deferred=False, label=None, gd=None, keep=False, use_graph=True, fullgraph=True):
    m = ctx.model
    ids = prompts(cfg, batch, plen)
    prev = m.config._attn_implementation
    if attn != prev:
        m.set_attn_implementation(attn)
    own = gd is None
    if own:
        backend = "eager" if (compile_mode and not is_cuda()) else None
        gd = GraphedDecode(m, max_cache_len=-(-(plen + n_new + 8) // 16) * 16, compile_mode=compile_mode,
                           compile_backend=backend, use_graph=use_graph, fullgraph=fullgraph)
    gd.install()
    gd.tag = f"{ref_tag}-{'graph' if compile_mode is None else 'graphc'}-{attn}-b{batch}"
    label = label or ("graph" if compile_mode is None else f"graph+compile({compile_mode})") + f"-{attn}"
    if deferred:
        label += "+deferredstop"
    try:
        with (DeferredStop() if deferred else _null()):
            seq, s = bench_generate(gd.generate, ids, cfg, n_new, runs=2)
        s["capture_s"] = [round(x, 2) for x in gd.capture_s]
        ref = load_ref(ref_tag, batch)
        if raw and gd.use_graph:
            rseq, r = gd.raw_decode(ids, n_new, attn)
            s.update(r)
            s["raw_tok_match_gen"] = bool(torch.equal(rseq.cpu(), seq.cpu()))
        ctx.row(label, batch, s, seq=seq, ref=ref, prompt_len=plen, attn=attn)
    finally:
        gd.uninstall()
        if attn != prev:
            m.set_attn_implementation(prev)
        # canonical model check: no instance attributes left behind
        assert "_valid_auto_compile_criteria" not in m.__dict__ and "get_compiled_call" not in m.__dict__
        if own and not keep:
            gd.release()
    return gd


def measure_hf_static(ctx, cfg, batch, n_new, plen, ref_tag, compile_cfg=None, attn="sdpa", force=False,
                      label=None):
    from transformers import CompileConfig

    m = ctx.model
    ids = prompts(cfg, batch, plen)
    prev = m.config._attn_implementation
    if attn != prev:
        m.set_attn_implementation(attn)
    extra = dict(cache_implementation="static")
    if compile_cfg is None:
        extra["disable_compile"] = True
    else:
        cc = CompileConfig(**compile_cfg)
        if not is_cuda():
            cc._compile_all_devices = True
            cc.backend = "eager"
            cc.mode = None
        extra["compile_config"] = cc
    fac = ForceAutoCompile(m).install() if force else None
    label = label or ("hf-static" if compile_cfg is None else
                      "hf-autocompile" + ("(forced)" if force else "") + json.dumps(compile_cfg, sort_keys=True)
                      .replace('"', "").replace(" ", "")) + f"-{attn}"
    try:
        seq, s = bench_generate(m.generate, ids, cfg, n_new, extra=extra, runs=2,
                                warm_new=8 if compile_cfg is None else None)
        try:
            from torch._dynamo.utils import counters

            s["dynamo_unique_graphs"] = counters["stats"].get("unique_graphs")
            s["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
        except Exception:
            pass
        ctx.row(label, batch, s, seq=seq, ref=load_ref(ref_tag, batch), prompt_len=plen, attn=attn)
    finally:
        if fac:
            fac.uninstall()
        if attn != prev:
            m.set_attn_implementation(prev)
        for a in ("_compiled_call", "_last_compile_config"):  # undo transformers' cached compiled call
            m.__dict__.pop(a, None)


def reset_compile():
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:
        pass
    cleanup()


# ---------------------------------------------------------------------------------------------------------- phases
def phase_env():
    info = dict(torch=torch.__version__, python=sys.version.split()[0])
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:
        info["bitsandbytes"] = f"ERR {e}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if is_cuda():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, mem_GB=round(p.total_memory / 1e9, 1),
                    cuda=torch.version.cuda)
        n = 2 * 2**30
        x = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            y.copy_(x)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        info["copy_bw_Bps"] = 2 * n / (statistics.median(ts) / 1e3)
        info["copy_bw_TBps"] = round(info["copy_bw_Bps"] / 1e12, 3)
        del x, y
        try:
            import bitsandbytes  # noqa: F401
            from bitsandbytes.cextension import lib

            info["bnb_lib"] = str(getattr(lib, "_name", None) or getattr(getattr(lib, "_lib", None), "_name", lib))[-80:]
            info["bnb_ops"] = sorted(n for n in dir(torch.ops.bitsandbytes) if not n.startswith("_"))[:40]
        except Exception as e:
            info["bnb_lib"] = f"ERR {e}"
    if OUTDIR:
        json.dump(info, open(os.path.join(OUTDIR, "env.json"), "w"), indent=1)
    record(dict(variant="env", **info))


def common(model_dtype=torch.bfloat16):
    cfg = make_config(big_name())
    base = build_base(cfg, model_dtype)
    return cfg, base


STEP_COST = {"nocudnn": 25, "graphcd": 12, "compileonly": 50, "diag": 15, "plain": 25, "eager": 25, "quiet": 25, "profile": 10, "graph": 15, "graph-eager": 15, "deferred": 12,
             "static": 25, "graphc": 100, "graphc-eager": 100, "hfauto": 110, "hfauto-eager": 110,
             "hfauto-fullgraph": 110, "graphfail": 20}


def phase_run():
    """One model (--target bf16|nf4|fp4|int8, --int8-threshold, --double-quant), a list of --steps.

    step tokens: plain, eager, quiet (int8: bnb logger silenced), profile, graph, graph-eager, deferred (graph +
    DeferredStopCheck), static (hf static cache, no compile), graphc, graphc-eager (graph of torch.compile'd
    forward), hfauto, hfauto-eager, hfauto-fullgraph (transformers' own auto-compile; forced for bnb), graphfail
    (int8 thr>0: show that capture fails). Suffix @8 = batch 8 (default batch 1)."""
    cfg, base = common()
    N, P = ARGS.new_tokens, ARGS.prompt_len
    target = ARGS.target
    if target == "bf16":
        m, tag = base, "bf16"
    else:
        qc = quant_config(target, torch.bfloat16, threshold=ARGS.int8_threshold, double_quant=ARGS.double_quant)
        m = load_quant(base, qc)
        del base
        cleanup()
        tag = target + ("-dq" if ARGS.double_quant else "") + (
            f"-thr{ARGS.int8_threshold:g}" if target == "int8" else "")
    ctx = Ctx(m, tag, get_bw())
    quiet = QuietBnbLogger if target == "int8" else _null
    gds = {}  # compiled GraphedDecode objects reused across batch sizes (one compile per batch shape)
    for tok in ARGS.steps.split(","):
        step, _, b = tok.partition("@")
        b = int(b or 1)
        cost = STEP_COST.get(step, 30) * (1.6 if (target == "int8" and ARGS.int8_threshold > 0 and step in (
            "plain", "quiet", "eager")) else 1) * (1.3 if b > 1 and step in ("plain", "eager", "quiet") else 1)
        if step.startswith("graphc") and step in gds:
            cost *= 0.7
        name = f"{tag} {step} b{b}"
        if not have_time(cost, name):
            continue
        if step == "plain":
            run_variant(name, lambda: measure_plain_family(ctx, cfg, b, N, P, tag, save_as_ref=True,
                                                           extra_ctx=quiet() if target == "int8" and b > 1 else None))
        elif step == "nocudnn":
            run_variant(name, lambda: measure_plain_family(ctx, cfg, b, N, P, tag, extra_ctx=NoCudnnSdpa(),
                                                           label="plain-sdpa-nocudnn"))
        elif step == "eager":
            run_variant(name, lambda: measure_plain_family(ctx, cfg, b, N, P, tag, attn="eager"))
        elif step == "quiet":
            run_variant(name, lambda: measure_plain_family(ctx, cfg, b, N, P, tag, extra_ctx=quiet(),
                                                           label="plain+quietlog-sdpa"))
        elif step == "profile":
            def prof():
                with quiet():
                    record(dict(model=tag, **profile_decode(m, prompts(cfg, b, P), 3, f"{tag}-plain-b{b}")))
            run_variant(name, prof)
        elif step in ("graph", "graph-eager", "graphfail"):
            attn = "eager" if step == "graph-eager" else "sdpa"
            run_variant(name, lambda: measure_graph(ctx, cfg, b, N, P, tag, attn=attn))
        elif step == "deferred":
            if is_cuda():
                run_variant(name, lambda: measure_graph(ctx, cfg, b, N, P, tag, deferred=True, raw=False))
        elif step == "static":
            run_variant(name, lambda: measure_hf_static(ctx, cfg, b, N, P, tag))
        elif step in ("graphc", "graphc-eager"):
            attn = "eager" if step == "graphc-eager" else "sdpa"

            def f():
                gds[step] = measure_graph(ctx, cfg, b, N, P, tag, compile_mode=ARGS.compile_mode, attn=attn,
                                          gd=gds.get(step), keep=True,
                                          label=f"graph+compile({ARGS.compile_mode})-{attn}")
            run_variant(name, f)
        elif step == "graphcd":  # reuse the compiled graph object of a previous graphc step (no recompile)
            run_variant(name, lambda: measure_graph(ctx, cfg, b, N, P, tag, compile_mode=ARGS.compile_mode,
                                                    gd=gds.get("graphc"), keep=True, deferred=True, raw=False,
                                                    label=f"graph+compile({ARGS.compile_mode})-sdpa"))
        elif step == "compileonly":
            def f():
                import torch._dynamo.config as dc

                dc.capture_dynamic_output_shape_ops = True
                dc.capture_scalar_outputs = True
                with quiet():
                    measure_graph(ctx, cfg, b, N, P, tag, compile_mode=ARGS.compile_mode, use_graph=False,
                                  fullgraph=False, raw=False, label=f"compile({ARGS.compile_mode})-nograph-sdpa")
                try:
                    from torch._dynamo.utils import counters

                    record(dict(model=tag, variant="compileonly-dynamo", graph_breaks=dict(
                        list(counters["graph_break"].items())[:5]), unique_graphs=counters["stats"].get(
                        "unique_graphs")))
                except Exception:
                    pass
            run_variant(name, f)
        elif step == "diag":
            run_variant(name, lambda: record(dict(model=tag, **diag_plain(m, cfg, P))))
        elif step.startswith("hfauto"):
            attn = "eager" if step == "hfauto-eager" else "sdpa"
            cc = dict(fullgraph=(step == "hfauto-fullgraph") or ARGS.fullgraph)
            run_variant(name, lambda: measure_hf_static(ctx, cfg, b, N, P, tag, compile_cfg=cc, attn=attn,
                                                        force=(target != "bf16")))
        else:
            log(f"unknown step {step}")
    for gd in gds.values():
        gd.release()
    reset_compile()


def small_generate(fn, ids, cfg, n, extra=None):
    res = fn(ids, return_dict_in_generate=True, output_logits=True, **gen_kwargs(cfg, n), **(extra or {}))
    return res.sequences, torch.stack(res.logits, 1).float()


def compare_runs(ref, fast, P):
    """tokens identical? else first divergence; logits max|diff| over the steps before it; ref's own top-1 margin
    over the fast path's token at the divergence (a flip is a numerical tie when that margin <= the logit noise)."""
    (sa, la), (sb, lb) = ref, fast
    ga, gb = sa[:, P:], sb[:, P:]
    n = min(ga.shape[1], gb.shape[1])
    diff = (ga[:, :n] != gb[:, :n])
    first = int(diff.float().argmax(1)[diff.any(1)].min()) if diff.any() else n
    k = min(first + 1, la.shape[1], lb.shape[1])  # logits of step `first` were computed from identical prefixes
    md = float((la[:, :k] - lb[:, :k]).abs().max()) if k > 0 else float("nan")
    out = dict(match=bool(not diff.any() and ga.shape == gb.shape), logit_maxdiff=round(md, 6),
               logit_absmax=round(float(la[:, :k].abs().max()), 3))
    if diff.any():
        r = int(diff[:, first].float().argmax())
        a, b = int(ga[r, first]), int(gb[r, first])
        out.update(first_div_step=first, rows_diverged=int(diff.any(1).sum()),
                   ref_margin=round(float(la[r, first, a] - la[r, first, b]), 6))
    return out


def phase_small():
    """Greedy-token (and logit) equality of the fast paths vs the non-fast paths on a SmolLM2-135M-shaped random model:
    refs = plain generate (DynamicCache) and hf-static (StaticCache, eager, no compile). 64-token prompt, 64 new."""
    cfg = make_config(small_name())
    P, N = (16, 12) if ARGS.tiny else (64, 64)
    methods = ARGS.small_methods.split(",")
    for dt_name in ARGS.small_dtypes.split(","):
        if remaining() < 20:
            log(f"SKIP small {dt_name}: time")
            continue
        quant = dt_name if dt_name in ("nf4", "fp4", "int8", "int8thr0") else None
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(dt_name, torch.bfloat16)
        base = build_base(cfg, dtype, seed=7, logit_scale=ARGS.logit_scale)
        if quant:
            m = load_quant(base, quant_config(quant.replace("thr0", ""), dtype,
                                              threshold=0.0 if quant == "int8thr0" else 6.0))
            del base
        else:
            m = base
        tag = f"small-{dt_name}"
        for b in [int(x) for x in ARGS.small_batches.split(",")]:
            ids = prompts(cfg, b, P)
            L = -(-(P + N + 8) // 16) * 16
            with torch.no_grad(), (QuietBnbLogger() if quant == "int8" else _null()):
                try:
                    refs = {"plain": small_generate(m.generate, ids, cfg, N),
                            "static": small_generate(m.generate, ids, cfg, N,
                                                     dict(cache_implementation="static", disable_compile=True,
                                                          max_cache_len=L))}
                except Exception as e:
                    record(dict(model=tag, variant="small-refs", batch=b, error=str(e)[:300]))
                    continue
                row = dict(model=tag, variant="static-vs-plain", batch=b)
                row.update(compare_runs(refs["plain"], refs["static"], P))
                record(row)
                for meth in methods:
                    if meth in ("graph", "graphc", "compileonly") and quant == "int8":
                        continue  # LLM.int8 threshold>0 cannot be graph-captured
                    if meth == "graphc" and b > 1 and not ARGS.small_graphc_b8:
                        continue
                    if not have_time(45 if meth == "graphc" else 8, f"small {tag} {meth} b{b}"):
                        continue
                    gd = None
                    try:
                        if meth == "eager":
                            m.set_attn_implementation("eager")
                            try:
                                fast = small_generate(m.generate, ids, cfg, N)
                            finally:
                                m.set_attn_implementation("sdpa")
                        elif meth in ("graph", "graphc"):
                            gd = GraphedDecode(m, max_cache_len=L, compile_mode="default" if meth == "graphc" else None,
                                               compile_backend="eager" if (meth == "graphc" and not is_cuda()) else None)
                            gd.install()
                            small_generate(gd.generate, ids, cfg, N)  # capture (+compile) run
                            fast = small_generate(gd.generate, ids, cfg, N)
                        elif meth == "quiet" and quant == "int8":
                            with QuietBnbLogger():
                                fast = small_generate(m.generate, ids, cfg, N)
                        else:
                            continue
                        for rname, rv in refs.items():
                            row = dict(model=tag, variant=f"{meth}-vs-{rname}", batch=b)
                            row.update(compare_runs(rv, fast, P))
                            record(row)
                    except Exception as e:
                        log(f"FAIL small {tag} {meth} b{b}: {e}\n{traceback.format_exc()[-2000:]}")
                        record(dict(model=tag, variant=f"{meth}", batch=b, error=f"{type(e).__name__}: {str(e)[:300]}"))
                    finally:
                        if gd is not None:
                            gd.release()
                        reset_compile()
        del m
        cleanup()


def phase_report():
    path = os.path.join(OUTDIR, "results.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    env = [r for r in rows if r.get("variant") == "env"]
    if env:
        e = env[-1]
        print(f"\nENV: {e.get('gpu')} torch {e.get('torch')} cuda {e.get('cuda')} transformers "
              f"{e.get('transformers')} bnb {e.get('bitsandbytes')} triton {e.get('triton')} copy "
              f"{e.get('copy_bw_TBps')} TB/s")
    hdr = f"{'model':<15}{'variant':<44}{'b':>2}{'ttft_ms':>9}{'steps/s':>9}{'raw':>9}{'%roof':>7}{'first_s':>8}" \
          f"{'step_med':>9}{'step_max':>9}  tokens"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        v = r.get("variant")
        if v in ("env",):
            continue
        if v == "profile":
            print(f"{r.get('model', ''):<15}PROFILE {r.get('label'):<36} wall {r.get('wall_ms_per_step')} ms/step,"
                  f" kernels {r.get('kernel_ms_per_step')} ms ({r.get('kernels_per_step')} launches,"
                  f" busy {r.get('gpu_busy_pct')}%), host {r.get('host_calls_per_step')}")
            for k in (r.get("top_kernels") or [])[:5]:
                print(f"{'':<21}{k[1]:>7} ms x{k[2]:<6} {k[0][:80]}")
            continue
        if "logit_maxdiff" in r:
            res = "SAME tokens" if r.get("match") else (
                f"DIFF@step{r.get('first_div_step')} rows={r.get('rows_diverged')} ref_margin={r.get('ref_margin')}")
            print(f"{r.get('model', ''):<15}{str(v)[:43]:<44}{r.get('batch', ''):>2}  {res:<48} logit max|diff| "
                  f"{r.get('logit_maxdiff')} (|logit|max {r.get('logit_absmax')})")
            continue
        if v == "compileonly-dynamo":
            print(f"{r.get('model', ''):<15}DYNAMO unique graphs {r.get('unique_graphs')}, graph breaks "
                  f"{r.get('graph_breaks')}")
            continue
        if v == "diag-plain":
            print(f"{r.get('model', ''):<15}DIAG plain generate {r.get('gen_ms_per_token_cprofile')} ms/token under "
                  f"cProfile; bare forward ms/step {r.get('fwd_ms')}")
            for k in (r.get("cprofile_top") or [])[:6]:
                print(f"{'':<21}{k[1]:>8} s x{k[2]:<7} {k[0]}")
            continue
        if r.get("skipped") or r.get("error"):
            print(f"{r.get('model', ''):<15}{str(v)[:43]:<44}  {'SKIPPED ' + r['skipped'] if r.get('skipped') else 'ERROR ' + r['error'][:150]}")
            continue
        tok = r.get("tok_match")
        if r.get("tok_note"):
            ts = r["tok_note"]
        elif tok is None:
            ts = "ref" if r.get("is_ref") else "n/a"
        elif tok:
            ts = "same"
        else:
            ts = f"DIFF@{r.get('tok_first_div_step')} gap={r.get('tok_gap_ref_minus_fast')} " \
                 f"(rows {r.get('tok_rows_diverged')})"

        def f(x, w, p=1):
            return f"{x:>{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"
        print(f"{r.get('model', ''):<15}{str(v)[:43]:<44}{r.get('batch', ''):>2}{f(r.get('ttft_ms'), 9)}"
              f"{f(r.get('decode_tok_s'), 9)}{f(r.get('raw_tok_s'), 9)}{f(r.get('pct_roofline_best'), 7)}"
              f"{f(r.get('first_call_s'), 8)}{f(r.get('step_ms_med'), 9, 2)}{f(r.get('step_ms_max'), 9, 1)}  {ts}"
              + (f"  [graph: {r.get('raw_step_ms')} ms/step, kernels {r.get('graph_kernel_ms')} ms,"
                 f" {r.get('graph_kernels')} launches]" if r.get('raw_step_ms') else ""))
        for k in (r.get("graph_top") or [])[:3]:
            print(f"{'':<21}{k[1]:>7} ms x{k[2]:<6} {k[0][:80]}")


def main():
    global ARGS, OUTDIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU logic check)")
    ap.add_argument("--phase", default="all",
                    help="env|run|small|report|all (all = CPU smoke test of everything)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_probe_out"))
    ap.add_argument("--deadline", type=float, default=0, help="absolute epoch seconds; variants are skipped past it")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--int8-threshold", type=float, default=6.0)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--target", default="bf16")
    ap.add_argument("--steps", default="plain,graph")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--fullgraph", action="store_true")
    ap.add_argument("--small-dtypes", default="fp32,bf16,nf4,int8,int8thr0")
    ap.add_argument("--small-methods", default="eager,graph,quiet,graphc")
    ap.add_argument("--logit-scale", type=float, default=4.0,
                    help="small model: final-norm weight multiplier (sharper, more real-ish next-token distribution)")
    ap.add_argument("--small-batches", default="1,8")
    ap.add_argument("--small-graphc-b8", action="store_true")
    ap.add_argument("--runs-always", type=int, default=0, help="timed runs per variant even when slow")
    ap.add_argument("--bw", type=float, default=0, help="copy bandwidth B/s (else read OUT/env.json)")
    ap.add_argument("--profile-graph", type=int, default=1, help="profile a few graph replays (kernel time)")
    ARGS = ap.parse_args()
    OUTDIR = ARGS.out
    os.makedirs(OUTDIR, exist_ok=True)
    if ARGS.tiny:
        ARGS.prompt_len, ARGS.new_tokens = min(ARGS.prompt_len, 16), min(ARGS.new_tokens, 12)
    torch.backends.cuda.matmul.allow_tf32 = False
    log(f"phase {ARGS.phase} device {ARGS.device} tiny={ARGS.tiny} out={OUTDIR} left={remaining():.0f}s")
    ph = ARGS.phase
    if ph == "env":
        phase_env()
    elif ph == "run":
        phase_run()
    elif ph == "small":
        phase_small()
    elif ph == "report":
        phase_report()
    elif ph == "all":  # CPU smoke test: every phase in one process
        phase_env()
        for tgt, thr, steps in (("bf16", 6.0, "plain,eager,profile,graph,graph-eager,static,graphc,hfauto,"
                                              "plain@8,graph@8,graphc@8"),
                                ("nf4", 6.0, "plain,profile,graph,graphc,hfauto,plain@8,graphc@8"),
                                ("fp4", 6.0, "plain,graph"),
                                ("int8", 6.0, "plain,quiet,profile,plain@8,graphfail"),
                                ("int8", 0.0, "plain,graph,graphc")):
            ARGS.target, ARGS.int8_threshold, ARGS.steps = tgt, thr, steps
            phase_run()
        phase_small()
        phase_report()
    log("phase done")


if __name__ == "__main__":
    main()
