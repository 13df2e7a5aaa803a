"""`kiln bench serve`: Kiln's engine beside gpt-fast and transformers on the same weights, same run.

Four tables (``--parts``), each on one model shape (random-init weights unless ``--model`` names a
trained one; the speed of a step does not depend on the values):

1. **Batch-1 decode** (``latency``): tokens/s generating ``--new-tokens`` greedy tokens after a
   ``--prompt-len`` prompt, one request. Rows: Kiln's engine (bf16 on CUDA, CUDA graphs for the decode
   step), its int8 and int4 weight-only models, speculative decoding (prompt lookup; a draft model),
   gpt-fast's ``generate.py`` (``--gpt-fast DIR``, run in a subprocess on the same weights exported
   and converted by gpt-fast's own script, ``--compile`` on CUDA), and ``transformers``
   (``LlamaForCausalLM.generate`` with a static cache, ``torch.compile(mode="reduce-overhead")`` on
   CUDA). ``bound`` = the share of the memory-bandwidth limit reached: bytes read per token (weights
   + the average KV cache) over a device copy bandwidth measured in the same run. ``loss``: held-out
   loss of the row's weights on ``--heldout`` text (only meaningful with a trained ``--model``).
2. **Throughput** (``throughput``): requests whose prompt lengths follow the AlpacaEval instructions
   (``--prompts``, ~4 UTF-8 bytes per token; synthetic ids, as the weights are random),
   ``--max-tokens`` greedy tokens each (no early stop), kept ``c`` in flight for c in
   ``--concurrency``: the first min(``--requests``, max(``--min-requests``, ``--waves`` x c)) requests at
   each c (so c=1 stays short; the note says how many ran). Output tokens/s, time to first token and inter-token latency
   (p50/p99) of Kiln's engine (one engine for every c, CUDA graphs captured before the clock), vs
   ``transformers`` batched ``generate`` (row ``transformers``: static batches of c, left-padded) and
   ``transformers``' own continuous batching (row ``transformers-cb``: its
   ``ContinuousBatchingManager``, the engine of ``transformers serve --continuous-batching``, driven
   in-process); see ``kiln.bench.serve_refs``.
3. **HTTP vs direct** (``http``): ``kiln bench serve-http``'s table on the first shape: chat requests
   through ``kiln serve`` vs the same engine called directly (and, row ``transformers-serve``,
   ``transformers serve --continuous-batching``); see ``kiln.bench.serve_http``.
4. **Rollouts** (``rollouts``): GSM8K generation and GRPO rollouts before (the pre-engine padded batch
   decoder) and after the engine; see ``kiln.bench.rollouts``.

Every reference row runs in a ``try``: a failure is a row with its error, not a crash. Rows not
started within ``--budget-s`` are listed as skipped; each part's rows are written to
``bench_serve.partial.json`` as it ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.bench.serve_models import export_for_references, serve_shapes

DEFAULT_PROMPTS = "../shared/data/align/alpaca_eval/alpaca_eval.jsonl"


@dataclass
class ServeRow:
    """One implementation on one measurement."""

    table: str
    shape: str
    impl: str
    concurrency: int = 1
    tok_s: float | None = None
    bound: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    loss: float | None = None
    note: str = ""
    error: str = ""


# -- models and weights ------------------------------------------------------------------------------


def bench_model(shape: str, device: Any, dtype: Any, model_dir: str | None, seed: int = 0,
                fuse: bool = False) -> Any:
    """The benchmarked Kiln model: ``model_dir`` loaded, or the named shape with random weights.
    ``fuse``: each layer's q/k/v and gate/up as one matrix each (``kiln.model.fuse_projections``), as
    ``kiln serve`` loads a model (``--no-fuse-projections`` turns it off for the Kiln rows)."""
    import torch

    from kiln.model import build_model, fuse_projections, load_pretrained

    if model_dir:
        model = load_pretrained(model_dir, device=device, dtype=dtype).eval()
    else:
        table = serve_shapes()
        if shape not in table:
            raise ValueError(f"unknown shape {shape!r}; use one of {sorted(table)}")
        torch.manual_seed(seed)
        model = build_model(replace(table[shape], attention_impl="sdpa" if device.type == "cuda" else "kiln"),
                            device=device, dtype=dtype).eval()
    return fuse_projections(model) if fuse else model


def largest_preset() -> str:
    """The ``serve_shapes`` name of Kiln's largest training preset (by parameters; today gpt2_small,
    124M, which is also the GPT-2-small-size model the decode goals name)."""
    import torch

    from kiln.model import Transformer
    from kiln.train.config import PRESETS

    names = {"tiny": "preset_tiny"}
    with torch.device("meta"):  # shapes only: no memory, no initialization
        sizes = {names.get(n, n): Transformer(f().model).num_params() for n, f in PRESETS.items()}
    return max(sizes, key=sizes.get)


def copy_bandwidth(device: Any, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5; CPU: 64 MiB."""
    import torch

    if device.type != "cuda":
        nbytes = 1 << 26
    src = torch.empty(nbytes // 2, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bytes_per_token(model: Any, context: int) -> int:
    """Weights read per decode step plus the KV cache at ``context`` tokens."""
    from kiln.model.quantize import weight_bytes

    c = model.config
    itemsize = next(model.parameters()).element_size()
    return weight_bytes(model) + 2 * c.n_layers * c.n_kv_heads * c.head_dim * context * itemsize


def _free(device: Any) -> None:
    """Collect engines (their scheduler refers back to them) and return cached GPU memory between rows."""
    import gc

    import torch

    gc.collect()
    torch._dynamo.reset()  # each engine compiles its own decode step: stay clear of the recompile limit
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- batch-1 decode ------------------------------------------------------------------------------------


def kiln_decode(model: Any, prompt: list[int], new_tokens: int, repeats: int, speculative: str = "none",
                draft: Any = None, compile_decode: bool = False, decode_steps: int = 8, temperature: float = 0.0,
                top_p: float | None = None, write_op: bool = True, decode_write: bool = False,
                tokenizer: Any = None, **sampling: Any) -> tuple[float, str]:
    """Best tokens/s of one request over ``repeats`` runs (after a warm-up that captures graphs): greedy,
    or sampled at ``temperature`` (and ``top_p``), seeded (each run draws the same tokens).
    ``write_op`` False: the cache write as ``index_copy_`` (``PagedKVCache.write_op``); ``decode_write``
    True: the cache write and the splits' combine inside the decode attention launch (``PagedKVCache.decode_write``).
    ``sampling``: more ``SamplingParams`` fields (penalties, min-p: the processed-logits graphs;
    ``structured``, which needs ``tokenizer``). Tokens/s counts the tokens each run made."""
    from kiln.generate import EngineConfig, LLMEngine, SamplingParams

    cfg = EngineConfig(max_num_seqs=1, max_num_batched_tokens=max(2048, len(prompt) + 8), num_blocks=None,
                       speculative=speculative, num_speculative_tokens=4, enable_prefix_caching=False,
                       compile_decode=compile_decode, decode_steps=decode_steps)
    eng = LLMEngine(model, tokenizer, cfg, draft_model=draft)
    eng.runner.cache.write_op = write_op
    eng.runner.cache.decode_write = decode_write
    params = SamplingParams(max_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=0, ignore_eos=True,
                            **sampling)
    dev = eng.device
    eng.generate([prompt], params)  # warm-up: Triton compilation, CUDA graph capture
    best = 0.0
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out = eng.generate([prompt], params)[0]
        _sync(dev)
        best = max(best, len(out.token_ids) / (time.perf_counter() - t0))
    s = eng.stats()
    notes = []
    if eng.runner.graph_max:
        notes.append(("compiled, " if compile_decode else "") + "CUDA graphs"
                     + (f", {eng.runner.decode_steps} steps per graph" if eng.runner.decode_steps > 1 else ", one step per graph"))
    if speculative != "none" and s["spec_proposed"]:
        notes.append(f"accepted {s['spec_accepted'] / s['spec_proposed']:.0%} of drafts")
    return best, "; ".join(notes)


def hf_decode(export_dir: Path, prompt: list[int], new_tokens: int, device: Any, repeats: int) -> tuple[float, str]:
    """transformers' LlamaForCausalLM, static cache; on CUDA ``generate`` compiles its own decoding forward
    (``CompileConfig``, mode reduce-overhead: CUDA graphs), as transformers 4.48+ and 5.x do for static
    caches. (Wrapping ``forward`` in torch.compile ourselves broke on 5.x: "CUDAGraphs output overwritten".)"""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(str(export_dir)).to(device=device, dtype=dtype).eval()
    note = "static cache"
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
          "cache_implementation": "static", "pad_token_id": 0}
    if device.type == "cuda":
        try:
            from transformers import CompileConfig

            kw["compile_config"] = CompileConfig(mode="reduce-overhead")
        except ImportError:  # older transformers: generate's default compile settings
            pass
    ids = torch.tensor([prompt], device=device)
    best = 0.0
    with torch.no_grad():
        for i in range(repeats + 2):  # two warm-ups: compilation and graph recording
            _sync(device)
            t0 = time.perf_counter()
            out = m.generate(ids, **kw)
            _sync(device)
            if i >= 2:
                best = max(best, (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    if getattr(m, "_compiled_call", None) is not None:
        note += ", generate's torch.compile (reduce-overhead)"
    elif device.type == "cuda":
        note += ", NOT compiled (generate's auto-compile did not engage)"
    return best, note


GPT_FAST_DRIVER = r'''
# Written by kiln bench serve: runs gpt-fast (its own code, from --gpt-fast) on Kiln's exported weights.
import json, re, sys, io, contextlib
from pathlib import Path
ref, export, work, mode, prompt_len, new_tokens, compile_, device = sys.argv[1:9]
sys.path.insert(0, ref); sys.path.insert(0, str(Path(ref) / "scripts"))
import types
sys.modules.setdefault("sentencepiece", types.ModuleType("sentencepiece"))  # only its tokenizer needs it; unused
import model as gm
hf = json.loads((Path(export) / "config.json").read_text())
gm.transformer_configs["kilnbench"] = dict(
    block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
    n_head=hf["num_attention_heads"], n_local_heads=hf["num_key_value_heads"], dim=hf["hidden_size"],
    intermediate_size=hf["intermediate_size"], rope_base=hf["rope_theta"], norm_eps=hf["rms_norm_eps"])
from convert_hf_checkpoint import convert_hf_checkpoint
ckdir = Path(work) / "kilnbench"; ckdir.mkdir(parents=True, exist_ok=True)
for f in ("model.safetensors", "model.safetensors.index.json", "config.json"):
    (ckdir / f).unlink(missing_ok=True); (ckdir / f).symlink_to(Path(export) / f)
convert_hf_checkpoint(checkpoint_dir=ckdir, model_name="kilnbench")
(ckdir / "tokenizer.model").write_bytes(b"")
ck = ckdir / "model.pth"
if mode in ("int8", "int4"):
    import quantize
    quantize.quantize(checkpoint_path=ck, mode=mode, groupsize=128, label="")
    ck = ckdir / ("modelint8.pth" if mode == "int8" else "modelint4.g128.pth")
import generate
class _Tok:
    def encode(self, s): return [1]
    def decode(self, ids): return ""
    def bos_id(self): return 1
    def eos_id(self): return 2
generate.get_tokenizer = lambda *a, **k: _Tok()
profile_trace, profile_init = (sys.argv[9:11] if len(sys.argv) > 10 else ("", "0"))  # --parts profile
num_samples = 2 if profile_trace else 5
_profile_call = num_samples + (1 if compile_ == "1" else 0)  # the last call: after the compile warm-up
#PROFILE_PATCH#
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    generate.main(prompt=int(prompt_len), num_samples=num_samples, max_new_tokens=int(new_tokens), batch_size=1, top_k=1,
                  temperature=1.0, checkpoint_path=ck, compile=compile_ == "1", device=device)
text = buf.getvalue()
m = re.findall(r"Average tokens/sec: ([0-9.]+)", text)
print(json.dumps({"tok_s": float(m[-1]) if m else None, "tail": text[-800:]}))
'''


def gpt_fast_decode(ref: Path, export_dir: Path, work: Path, mode: str, prompt_len: int, new_tokens: int,
                    device: Any, profile_trace: Path | None = None, profile_init: bool = False) -> tuple[float, str]:
    """gpt-fast's generate.main (5 samples; its own average tok/s) in a subprocess, on the exported weights.
    With ``profile_trace``: 2 samples, the last one's ``decode_n_tokens`` under torch.profiler, its Chrome
    trace written there (``kiln.bench.decode_profile``)."""
    if not (ref / "generate.py").is_file():
        raise FileNotFoundError(f"--gpt-fast {ref} has no generate.py (see /work/shared/refs/README.md)")
    driver = work / "gpt_fast_driver.py"
    patch = ""
    if profile_trace is not None:
        from kiln.bench.decode_profile import GPT_FAST_PROFILE_PATCH as patch
    driver.write_text(GPT_FAST_DRIVER.replace("#PROFILE_PATCH#", patch))
    compile_ = "1" if device.type == "cuda" else "0"
    extra = [str(Path(profile_trace).resolve()), "1" if profile_init else "0"] if profile_trace is not None else []
    proc = subprocess.run([sys.executable, str(driver), str(ref.resolve()), str(export_dir), str(work), mode,
                           str(prompt_len), str(new_tokens), compile_, device.type, *extra],
                          check=False, capture_output=True, text=True, timeout=1800, cwd=str(work))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"gpt-fast failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-600:]}")
    res = json.loads(lines[-1])
    if res["tok_s"] is None:
        raise RuntimeError(f"gpt-fast printed no tokens/sec: {res['tail']}")
    return res["tok_s"], "compile" if compile_ == "1" else "eager"


def heldout_loss(model: Any, tokens: list[int], seq: int) -> float:
    """Mean next-token loss (nats) over ``tokens`` cut into windows of ``seq``."""
    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    n = (len(tokens) - 1) // seq
    if n < 1:
        return float("nan")
    x = torch.tensor(tokens[: n * seq + 1], device=dev)
    total = 0.0
    with torch.inference_mode():
        for i in range(n):
            w = x[i * seq:(i + 1) * seq + 1]
            logits = model(w[None, :-1]).float()
            total += F.cross_entropy(logits[0], w[1:]).item()
    return total / n


def latency_table(args: argparse.Namespace, shape: str, device: Any, work: Path) -> list[ServeRow]:
    """Table 1 on one shape."""
    import copy

    import torch

    from kiln.model import quantize_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fuse = args.fuse_projections  # before quantize_model below: the int8/int4 rows are fused too
    model = bench_model(shape, device, dtype, args.model, fuse=fuse)
    V, ctx = model.config.vocab_size, model.config.context_length
    g = torch.Generator().manual_seed(0)
    plen = max(1, min(args.prompt_len, ctx // 2))
    new_tokens = min(args.new_tokens, ctx - plen)
    prompt = torch.randint(0, min(V, 1024), (plen,), generator=g).tolist()
    bw = copy_bandwidth(device)
    heldout = _heldout_tokens(args, V)
    rows: list[ServeRow] = []
    print(f"{shape}: copy bandwidth {bw / 1e9:.0f} GB/s; prompt {plen}, {new_tokens} new tokens", flush=True)

    def add(impl: str, fn: Any, m: Any = None, loss_model: Any = None) -> None:
        row = ServeRow("decode", shape, impl)
        try:
            row.tok_s, row.note = fn()
            if m is not None:
                row.bound = row.tok_s * bytes_per_token(m, plen + new_tokens // 2) / bw
            if loss_model is not None and heldout:
                row.loss = heldout_loss(loss_model, heldout, min(ctx, 256))
        except Exception as e:  # noqa: BLE001 - a failed row is reported, not fatal
            row.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        _free(device)
        print(f"  {impl}: {row.tok_s or 0:.1f} tok/s {row.note} {row.error}", flush=True)

    r, cuda = args.repeats, device.type == "cuda"
    name = "kiln bf16" if dtype == torch.bfloat16 else "kiln fp32"
    # The default path: compiled decode step, CUDA graphs, multi-step decode (on CUDA).
    add(name, lambda: kiln_decode(model, prompt, new_tokens, r, compile_decode=cuda), model, model)
    if "unfused" in args.rows and fuse:  # the same model with q/k/v and gate/up as separate products (an A/B)
        from kiln.model import unfuse_projections

        um = unfuse_projections(copy.deepcopy(model))
        add(f"{name} unfused projections", lambda um=um: kiln_decode(um, prompt, new_tokens, r, compile_decode=cuda),
            um)
        del um
    if "single-step" in args.rows and cuda:  # the previous default: one decode step per host round trip
        add(f"{name} single-step", lambda: kiln_decode(model, prompt, new_tokens, r, compile_decode=True,
                                                       decode_steps=1), model)
    if "index-copy" in args.rows and cuda:  # the cache write before kiln::kv_write, measured beside it
        add(f"{name} index_copy_ write", lambda: kiln_decode(model, prompt, new_tokens, r, compile_decode=True,
                                                              write_op=False), model)
    if "one-launch" in args.rows and cuda:  # the cache write and the split combine inside the attention kernel
        add(f"{name} one-launch attention", lambda: kiln_decode(model, prompt, new_tokens, r, compile_decode=True,
                                                                decode_write=True), model)
    if "eager" in args.rows and cuda:
        add(f"{name} not compiled", lambda: kiln_decode(model, prompt, new_tokens, r), model)
    if "sampled" in args.rows:  # sampled decode: the sampler inside the same graphs
        T, P = args.temperature, args.top_p
        add(f"{name} sampled T={T:g}", lambda: kiln_decode(model, prompt, new_tokens, r, compile_decode=cuda,
                                                           temperature=T), model)
        add(f"{name} sampled T={T:g} top-p {P:g}", lambda: kiln_decode(
            model, prompt, new_tokens, r, compile_decode=cuda, temperature=T, top_p=P), model)
        if cuda:  # multi-step's share (on the CPU there are no graphs: the same path)
            add(f"{name} sampled T={T:g} single-step", lambda: kiln_decode(
                model, prompt, new_tokens, r, compile_decode=cuda, decode_steps=1, temperature=T), model)
    if "structured" in args.rows:  # JSON mode: a host-side grammar mask each token, one step per graph replay
        from kiln.bench.serve_http import chat_tokenizer
        from kiln.generate import StructuredOutput

        T, tok = args.temperature, chat_tokenizer(args.tokenizer)
        add(f"{name} sampled T={T:g} + JSON object", lambda: kiln_decode(
            model, prompt, new_tokens, r, compile_decode=cuda, temperature=T, tokenizer=tok,
            structured=StructuredOutput(json_object=True)), model)
    if "penalties" in args.rows:  # processed logits: the per-request table read and counted inside the graphs
        T = args.temperature
        add(f"{name} sampled T={T:g} + penalties", lambda: kiln_decode(
            model, prompt, new_tokens, r, compile_decode=cuda, temperature=T, frequency_penalty=0.5,
            presence_penalty=0.5, repetition_penalty=1.1, min_p=0.05), model)
    for mode, tuned in (("int8", False), ("int4", False), ("int8", True), ("int4", True)):
        if (f"{mode}-tuned" if tuned else mode) in args.rows:  # -tuned: Kiln's autotuned GEMV at one row too
            qm = quantize_model(copy.deepcopy(model), mode, tuned=tuned)
            add(f"kiln {mode}" + (" tuned GEMV" if tuned else ""),
                lambda qm=qm: kiln_decode(qm, prompt, new_tokens, r, compile_decode=cuda), qm, qm)
            del qm
    if "ngram" in args.rows:
        add("kiln spec ngram", lambda: kiln_decode(model, prompt, new_tokens, r, "ngram", compile_decode=cuda), model)
    if "draft" in args.rows:
        draft = (bench_model("", device, dtype, args.draft_model, fuse=fuse) if args.draft_model
                 else build_draft(model, device, dtype, fuse))
        add("kiln spec draft", lambda: kiln_decode(model, prompt, new_tokens, r, "draft", draft, compile_decode=cuda),
            model)
    export = None
    if {"gpt-fast", "gpt-fast-int8", "gpt-fast-int4", "transformers"} & set(args.rows):
        export = export_for_references(model, work / f"export_{shape}")
    for mode, ref in (("bf16", "gpt-fast"), ("int8", "gpt-fast-int8"), ("int4", "gpt-fast-int4")):
        if ref in args.rows and args.gpt_fast:
            add(ref, lambda mode=mode: gpt_fast_decode(Path(args.gpt_fast), export, work, mode, plen,
                                                       new_tokens, device), model)
    if "transformers" in args.rows:  # last: a failed CUDA-graph run cannot disturb the rows before it
        add("transformers", lambda: hf_decode(export, prompt, new_tokens, device, r), model)
    return rows


# -- host work per decode token (the forward stubbed out) -------------------------------------------------


def host_table(args: argparse.Namespace, shape: str, device: Any) -> list[ServeRow]:
    """What one decode token costs the host in each engine path, with the model's forward replaced by a
    stub that returns 16 zero logits (the GPU's share removed: the layers, the head, the argmax over the
    vocabulary; the engine's bookkeeping, copies and graph replays kept): the general step (per-step
    Python packing, ``run``), the lean step (one copy in, argmax in the graph, one copy out) and
    multi-step decode; with row 'sampled', the two graph paths sampling at ``--temperature`` too (the
    sampler's ops over the 16 logits then count as host work on the CPU, as graph replays on CUDA).
    Graph paths are emulated on the CPU (their in-graph ops then run eagerly)."""
    import torch

    from kiln.bench.serve_paced import replace_model_work

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = bench_model(shape, device, dtype, None)
    zeros = torch.zeros(8, 16, device=device)
    replace_model_work(model, zeros)  # the forward removed: zero hidden states, 16 zero logits a row
    plen = max(1, min(args.prompt_len, model.config.context_length // 2))
    n = min(args.new_tokens, model.config.context_length - plen)
    rows = []
    # (label, graphs, decode steps per graph, temperature, speculative)
    paths = [("general step", False, 1, 0.0, "none"), ("lean step", True, 1, 0.0, "none"),
             ("multi-step", True, 8, 0.0, "none")]
    if "sampled" in args.rows:
        T = args.temperature
        paths += [(f"lean step T={T:g}", True, 1, T, "none"), (f"multi-step T={T:g}", True, 8, T, "none")]
    if "ngram" in args.rows:  # zero logits repeat token 0, so every draft is accepted: the host's
        paths.append(("spec ngram k=4", True, 1, 0.0, "ngram"))  # cost per token at full acceptance
    for label, graphs, steps, temp, spec in paths:
        rows.append(_host_row(model, shape, label, graphs, steps, plen, n, args.repeats, zeros, temp, spec))
        print(f"  host {label}: {rows[-1].note}", flush=True)
    return rows


def _host_row(model: Any, shape: str, label: str, graphs: bool, steps: int, plen: int, n: int, repeats: int,
              zeros: Any, temperature: float = 0.0, speculative: str = "none") -> ServeRow:
    """One path of ``host_table``: best tokens/s of one request (greedy, or sampled at ``temperature``,
    seeded; ``speculative`` 'ngram': 4 drafts a step, verified through the graph of 8 rows), the
    forward stubbed."""
    from kiln.bench.serve_paced import replace_decode
    from kiln.generate import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=1, enable_prefix_caching=False, cuda_graphs=graphs,
                                              decode_steps=steps, speculative=speculative, num_speculative_tokens=4))
    if graphs and not eng.runner.graph_max:  # the CPU: the graph body runs eagerly over the same static buffers
        eng.runner.graph_max = 1 if speculative == "none" else 8
    replace_decode(eng.runner, zeros)  # the graph paths: zero logits, token 0
    params = SamplingParams(max_tokens=n, temperature=temperature, seed=0, ignore_eos=True)
    eng.generate([[1] * plen], params)  # warm-up (captures)
    best = 0.0
    for _ in range(repeats):
        _sync(eng.device)
        t0 = time.perf_counter()
        out = eng.generate([[1] * plen], params)[0]
        _sync(eng.device)
        best = max(best, len(out.token_ids) / (time.perf_counter() - t0))
    note = f"{1e6 / best:.0f} us/token" + (f", {steps} steps per graph" if steps > 1 else "")
    if speculative != "none":
        note += f", accepted {eng.spec_counts['accepted']}/{eng.spec_counts['proposed']} drafts"
    return ServeRow("host", shape, label, tok_s=best, note=note)


# -- where a decode token's GPU time goes (torch.profiler) ------------------------------------------------


def profile_part(args: argparse.Namespace, shape: str, device: Any, work: Path) -> list[Any]:
    """The profile part on one shape (``kiln.bench.decode_profile``): Kiln's tables, then gpt-fast's (with
    ``--gpt-fast``). Writes the Chrome traces and ``decode_profile_<shape>.md`` / ``.json`` under
    ``--out``/profile (else the work folder)."""
    from dataclasses import asdict

    import torch

    from kiln.artifacts import write_json_atomic, write_text_atomic
    from kiln.bench.decode_profile import (
        ProfileTable,
        format_profiles,
        gpt_fast_table,
        kiln_profiles,
    )

    out = Path(args.out) / "profile" if args.out else work / "profile"
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = bench_model(shape, device, dtype, args.model, fuse=args.fuse_projections)
    ctx = model.config.context_length
    plen = max(1, min(args.prompt_len, ctx // 4))
    w = 2 if device.type == "cuda" else 1  # windows: graph replays, the same step without the graph
    warm = max(1, min(16, (ctx - plen) // 8))
    tokens = max(1, min(args.profile_tokens, (ctx - plen - 9 - w * warm) // w))
    prompt = torch.randint(0, min(model.config.vocab_size, 1024), (plen,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    tables: list[Any] = []
    try:
        tables += kiln_profiles(model, prompt, tokens, warm, device, out, shape, args.profile_init,
                                prefill_only=args.profile_tables == "prefill")
    except Exception as e:  # noqa: BLE001 - reported as the table's error
        traceback.print_exc()
        tables.append(ProfileTable("kiln", shape, error=f"{type(e).__name__}: {e}"))
    _free(device)
    if args.gpt_fast and args.profile_tables != "prefill":
        try:
            export = export_for_references(model, work / f"export_{shape}")
            trace = out / "gpt_fast.json"
            gpt_fast_decode(Path(args.gpt_fast), export, work, "bf16", plen, tokens + 1, device, profile_trace=trace,
                            profile_init=args.profile_init)
            tables.append(gpt_fast_table(trace, shape, device.type == "cuda"))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            tables.append(ProfileTable("gpt-fast", shape, error=f"{type(e).__name__}: {e}"))
    elif args.profile_tables != "prefill":
        tables.append(ProfileTable("gpt-fast", shape, error="skipped: no --gpt-fast DIR"))
    del model
    _free(device)
    if any("no GPU kernels" in t.error for t in tables) and not getattr(args, "profile_rerun", False):
        tables = _profile_again(args, shape, out, tables)
    text = format_profiles(tables)
    print(text, flush=True)
    write_text_atomic(out / f"decode_profile_{shape}.md", text + "\n")
    write_json_atomic(out / f"decode_profile_{shape}.json", [asdict(t) for t in tables])
    return tables


def _profile_again(args: argparse.Namespace, shape: str, out: Path, tables: list[Any]) -> list[Any]:
    """The tables that came back without GPU kernels, measured again in a fresh process with
    ``--profile-init`` flipped (CUPTI's tracing of graph replays depends on when the profiler first
    started: before capture on older stacks, and on some CUDA 13 stacks an early empty session turns it off)."""
    from kiln.bench.decode_profile import ProfileTable

    flip = not args.profile_init
    redo = out / ("init" if flip else "no_init")
    cmd = [sys.executable, "-m", "kiln.bench.serve", "--parts", "profile", "--profile-rerun", "--shapes", shape,
           "--device", args.device, "--prompt-len", str(args.prompt_len), "--profile-tokens", str(args.profile_tokens),
           "--profile-tables", args.profile_tables, "--out", str(redo)] + (["--model", args.model] if args.model else []) \
        + (["--profile-init"] if flip else []) + ([] if args.fuse_projections else ["--no-fuse-projections"])
    if args.gpt_fast and any(t.impl == "gpt-fast" and "no GPU kernels" in t.error for t in tables):
        cmd += ["--gpt-fast", args.gpt_fast]
    print(f"  profile: no GPU kernels traced; again in a fresh process: {' '.join(cmd)}", flush=True)
    try:
        subprocess.run(cmd, check=False, timeout=900)
        again = {t["impl"]: ProfileTable.from_dict(t) for t in
                 json.loads((redo / "profile" / f"decode_profile_{shape}.json").read_text())}
    except Exception as e:  # noqa: BLE001 - the first tables stand, errors and all
        print(f"  profile rerun failed: {type(e).__name__}: {e}", flush=True)
        return tables
    fixed = []
    for t in tables:
        new = again.get(t.impl)
        if "no GPU kernels" in t.error and new is not None and not new.error:
            new.note += (f"; measured in a fresh process {'with' if flip else 'without'} _init_for_cuda_graphs "
                         f"before capture ({redo.name}/)")
            t = new
        fixed.append(t)
    return fixed


def build_draft(model: Any, device: Any, dtype: Any, fuse: bool = False) -> Any:
    """A 2-layer draft with the model's vocabulary and context, random weights (acceptance is then
    low; pass --draft-model for a trained one); ``fuse`` as ``bench_model``'s."""
    import torch

    from kiln.model import build_model, fuse_projections

    c = model.config
    torch.manual_seed(1)
    cfg = replace(c, n_layers=2, d_model=max(64, c.d_model // 4), n_heads=max(1, c.n_heads // 4),
                  n_kv_heads=max(1, c.n_heads // 4), d_ff=max(128, c.d_ff // 4))
    draft = build_model(cfg, device=device, dtype=dtype).eval()
    return fuse_projections(draft) if fuse else draft


def _heldout_tokens(args: argparse.Namespace, vocab: int) -> list[int]:
    """Held-out token ids for the loss column: a Kiln tokenizer on ``--heldout`` text, or nothing."""
    if not (args.heldout and args.tokenizer and Path(args.heldout).is_file()):
        return []
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    text = Path(args.heldout).read_text(encoding="utf-8")[: args.heldout_chars]
    return [t for t in tok.encode(text) if t < vocab]


# -- throughput ------------------------------------------------------------------------------------------


def prompt_lengths(path: str, n: int, bytes_per_token: int = 4) -> list[int]:
    """Token counts of the first ``n`` AlpacaEval instructions (~bytes/4), cycled; synthetic if absent."""
    lens: list[int] = []
    p = Path(path)
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                lens.append(max(1, len(json.loads(line)["instruction"].encode()) // bytes_per_token))
    if not lens:
        lens = [8 + (i * 37) % 120 for i in range(64)]
    return [lens[i % len(lens)] for i in range(n)]


def synthetic_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 50257), (n,), generator=g).tolist() for n in lengths]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)] * 1e3


def _count(c: int, total: int, least: int = 16, waves: int = 8) -> int:
    """Requests run at concurrency ``c``: enough to keep c in flight for a while (``waves`` x c, at
    least ``least``: ``--min-requests``), so c = 1 stays short; at most ``total`` (``--requests``)."""
    return min(total, max(least, waves * c))


def _throughput_row(t: Any, impl: str, shape: str, c: int, n: int, note: str = "") -> ServeRow:
    """A throughput row from ``serve_http.Timings``."""
    notes = [f"{n} requests"] + ([note] if note else []) + ([f"{t.errors} failed"] if t.errors else [])
    return ServeRow("throughput", shape, impl, c, t.tokens / t.seconds if t.seconds else None, None,
                    _pct(t.ttft, 0.5), _pct(t.ttft, 0.99), _pct(t.itl, 0.5), _pct(t.itl, 0.99), note=", ".join(notes))


def throughput_engine(model: Any, max_concurrency: int) -> Any:
    """One engine for every concurrency (CUDA graphs captured once, by a warm-up that runs here: the
    temperature-only sampled graphs of the sampled rows too)."""
    from kiln.generate import EngineConfig, LLMEngine, SamplingParams

    eng = LLMEngine(model, None, EngineConfig(max_num_seqs=max_concurrency,
                                              max_num_batched_tokens=max(2048, max_concurrency)))
    eng.warmup()  # every prefill length class and decode path compiled before the first timed row
    eng.generate([[1, 2, 3]] * min(4, max_concurrency), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    return eng


def kiln_throughput(model: Any, prompts: list[list[int]], concurrency: int, max_tokens: int,
                    engine: Any = None, temperature: float = 0.0, top_p: float | None = None) -> ServeRow:
    """Keep ``concurrency`` requests in the engine (``engine``, or a new one) until all are done;
    TTFT from ``add_request`` to the first token, ITL between a request's tokens. Greedy, or sampled
    at ``temperature`` / ``top_p`` (request i seeded i)."""
    from kiln.bench.serve_http import run_direct

    eng = engine if engine is not None else throughput_engine(model, concurrency)
    before = eng.stats()["preemptions"]
    t = run_direct(eng, prompts, concurrency, max_tokens, temperature, top_p)
    _sync(next(model.parameters()).device)
    return _throughput_row(t, "kiln engine", "", concurrency, len(prompts),
                           f"{eng.stats()['preemptions'] - before} preemptions")


def over_budget(args: argparse.Namespace) -> bool:
    """True once ``--budget-s`` seconds have passed since the command started (0: never)."""
    return bool(getattr(args, "budget_s", 0)) and time.monotonic() > args.started + args.budget_s


def _skipped(table: str, shape: str, impl: str, c: int) -> ServeRow:
    print(f"  {shape} c={c} {impl}: skipped (over --budget-s)", flush=True)
    return ServeRow(table, shape, impl, c, note="skipped: over --budget-s")


def throughput_table(args: argparse.Namespace, shape: str, device: Any, work: Path) -> list[ServeRow]:
    """Kiln's engine, then transformers' batched generate and its continuous batching, at each c."""
    import torch

    T = args.temperature
    impls = ["kiln engine"] + ([f"kiln engine T={T:g}"] if "sampled" in args.rows else []) + [i for r, i in (("transformers", "transformers generate"),
                                             ("transformers-cb", "transformers cb")) if r in args.rows]
    if over_budget(args):
        return [_skipped("throughput", shape, i, c) for i in impls for c in args.concurrency]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = bench_model(shape, device, dtype, args.model, fuse=args.fuse_projections)
    ctx = model.config.context_length
    lens = [min(n, ctx - args.max_tokens) for n in prompt_lengths(args.prompts, args.requests)]
    prompts = synthetic_prompts(lens, model.config.vocab_size)
    M, cs = args.max_tokens, args.concurrency
    rows: list[ServeRow] = []

    def add(impl: str, c: int, fn: Any) -> None:
        n = _count(c, len(prompts), args.min_requests, args.waves)
        if over_budget(args):
            rows.append(_skipped("throughput", shape, impl, c))
            return
        try:
            row = fn(prompts[:n], c)
        except Exception as e:  # noqa: BLE001 - a failed row is reported, not fatal
            traceback.print_exc()
            row = ServeRow("throughput", shape, impl, c, note=f"{n} requests", error=f"{type(e).__name__}: {e}")
        row.shape, row.impl = shape, impl
        rows.append(row)
        lat = (f" (ttft p50 {row.ttft_p50_ms:.1f} ms, itl p50 {row.itl_p50_ms:.2f} ms)"
               if row.ttft_p50_ms is not None and row.itl_p50_ms is not None else "")
        print(f"  {shape} c={c} {impl}: {row.tok_s or 0:.1f} tok/s{lat} {row.error}", flush=True)

    engine = throughput_engine(model, max(cs))
    for c in cs:
        add("kiln engine", c, lambda p, c: kiln_throughput(model, p, c, M, engine))
        if "sampled" in args.rows:  # the same requests sampled (GRPO's rollouts sample at T 0.7)
            add(f"kiln engine T={T:g}", c, lambda p, c: kiln_throughput(model, p, c, M, engine, T))
    engine = None  # its KV pool goes before the references load
    _free(device)
    if {"transformers", "transformers-cb"} & set(args.rows):
        hf_throughput_rows(export_for_references(model, work / f"export_{shape}"), args, device, add)
    return rows


def _raise(e: Exception) -> Any:
    def fn(*_: Any) -> Any:
        raise e

    return fn


def hf_throughput_rows(export_dir: Path, args: argparse.Namespace, device: Any, add: Any) -> None:
    """The transformers rows, each through ``add(impl, c, fn(prompts, c) -> ServeRow)``; the model is
    loaded once, the continuous-batching manager started once (its CUDA graphs captured once)."""
    from kiln.bench.serve_refs import hf_cb_manager, hf_cb_run, hf_generate_run, load_hf

    M, cs = args.max_tokens, args.concurrency
    impls = [i for r, i in (("transformers", "transformers generate"), ("transformers-cb", "transformers cb"))
             if r in args.rows]
    try:
        hf = load_hf(export_dir, device)
    except Exception as e:  # noqa: BLE001 - every transformers row then carries the error
        traceback.print_exc()
        for impl in impls:
            for c in cs:
                add(impl, c, _raise(e))
        return
    if "transformers generate" in impls:
        hf_generate_run(hf, [[1, 2, 3]] * 2, 2, 2)  # warm-up: kernels
        for c in cs:
            add("transformers generate", c, lambda p, c: _throughput_row(
                hf_generate_run(hf, p, c, M), "", "", c, len(p), "static batches, left padding"))
    if "transformers cb" in impls:
        manager = None
        try:
            manager = None if over_budget(args) else hf_cb_manager(hf, M, max(cs))
            for c in cs:
                add("transformers cb", c, lambda p, c: _throughput_row(
                    hf_cb_run(manager, p, c, M), "", "", c, len(p), "ContinuousBatchingManager"))
        except Exception as e:  # noqa: BLE001 - the manager did not start
            traceback.print_exc()
            add("transformers cb", cs[0], _raise(e))
        finally:
            if manager is not None:
                manager.stop(block=True, timeout=30)
    hf = None
    _free(device)


def http_table(args: argparse.Namespace, device: Any, work: Path) -> list[Any]:
    """``kiln bench serve-http``'s rows (``serve_http.measure``): the direct engine, ``kiln serve`` over
    HTTP and (row ``transformers-serve``) ``transformers serve --continuous-batching``, on the first
    of ``--shapes``, with this command's prompts, tokenizer, concurrencies and token count."""
    from kiln.bench.serve_http import measure

    ns = argparse.Namespace(shape=args.shapes_list[0], tokenizer=args.tokenizer or "", prompts=args.prompts,
                            requests=args.requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                            engine=dict(args.engine_overrides), client_procs=args.client_procs, threads=args.threads,
                            min_requests=args.min_requests, server_engine=args.server_engine,
                            transformers="transformers-serve" in args.rows, http_row_s=args.http_row_s,
                            waves=args.waves, pairs=args.pairs, fuse_projections=args.fuse_projections)
    if over_budget(args):
        from kiln.bench.serve_http import HttpRow

        return [HttpRow("kiln http", c, note="skipped: over --budget-s") for c in args.concurrency]
    (work / "http").mkdir(exist_ok=True)
    return measure(ns, device, work / "http")


# -- report ---------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


def format_tables(rows: list[ServeRow]) -> str:
    out = []
    dec = [r for r in rows if r.table == "decode"]
    if dec:
        out += ["| shape | impl | tok/s | vs kiln | bound | held-out loss | note |", "|---|---|---|---|---|---|---|"]
        base = {r.shape: r.tok_s for r in dec if r.impl in ("kiln bf16", "kiln fp32")}
        for r in dec:
            rel = f"{r.tok_s / base[r.shape]:.2f}x" if r.tok_s and base.get(r.shape) else ""
            note = r.note + (f" ERROR {r.error[:160]}" if r.error else "")
            out.append(f"| {r.shape} | {r.impl} | {_f(r.tok_s)} | {rel} | {_f(r.bound and 100 * r.bound, '.0f')}"
                       f"{'%' if r.bound else ''} | {_f(r.loss, '.4f')} | {note} |")
    host = [r for r in rows if r.table == "host"]
    if host:
        out += ["", "| shape | engine path, forward stubbed | host tok/s | host us/token |", "|---|---|---|---|"]
        for r in host:
            out.append(f"| {r.shape} | {r.impl} | {_f(r.tok_s, '.0f')} | {_f(r.tok_s and 1e6 / r.tok_s, '.0f')} |")
    thr = [r for r in rows if r.table == "throughput"]
    if thr:
        out += ["", "| shape | impl | concurrency | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | note |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in thr:
            note = r.note + (f" ERROR {r.error[:160]}" if r.error else "")
            out.append(f"| {r.shape} | {r.impl} | {r.concurrency} | {_f(r.tok_s)} | {_f(r.ttft_p50_ms)} | "
                       f"{_f(r.ttft_p99_ms)} | {_f(r.itl_p50_ms, '.2f')} | {_f(r.itl_p99_ms, '.2f')} | {note} |")
    return "\n".join(out)


ROWS = ("unfused", "one-launch", "single-step", "eager", "index-copy", "sampled", "penalties", "structured", "int8",
        "int4", "int8-tuned",
        "int4-tuned", "ngram",
        "draft", "transformers", "transformers-cb", "transformers-serve", "gpt-fast", "gpt-fast-int8", "gpt-fast-int4")
OPT_IN_ROWS = ("unfused", "one-launch", "sampled", "penalties", "structured", "int8-tuned", "int4-tuned")  # not in the default --rows
PARTS = ("latency", "throughput", "http", "rollouts", "host", "profile")


def rollouts_table(args: argparse.Namespace, shape: str, device: Any) -> list[Any]:
    """The rollouts part on ``shape`` (vocabulary widened to the tokenizer's if it is larger)."""
    import torch

    from kiln.bench.rollouts import RolloutRow, rollout_rows
    from kiln.bench.serve_http import chat_tokenizer
    from kiln.model import build_model

    if over_budget(args):
        print(f"  {shape} rollouts: skipped (over --budget-s)", flush=True)
        return [RolloutRow("rollouts", t, "all", note="skipped: over --budget-s") for t in ("gsm8k", "grpo")]
    tok = chat_tokenizer(args.tokenizer)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        model = bench_model(shape, device, dtype, args.model)
    else:
        cfg = serve_shapes()[shape]
        cfg = replace(cfg, vocab_size=max(cfg.vocab_size, tok.vocab_size),
                      attention_impl="sdpa" if device.type == "cuda" else "kiln")
        torch.manual_seed(0)
        model = build_model(cfg, device=device, dtype=dtype).eval()
    try:
        return rollout_rows(model, tok, args)
    finally:
        del model
        _free(device)


def _tables(rows: list[Any]) -> str:
    from kiln.bench.decode_profile import ProfileTable, format_profiles
    from kiln.bench.rollouts import RolloutRow, format_rollouts
    from kiln.bench.serve_http import HttpRow, format_table

    parts = [format_tables([r for r in rows if isinstance(r, ServeRow)])]
    prof = [r for r in rows if isinstance(r, ProfileTable)]
    if prof:
        parts.append("Where a batch-1 decode token's time goes (torch.profiler; GPU kernels on CUDA, CPU op self "
                     "times on the CPU; per token of the profiled window):\n\n" + format_profiles(prof))
    http = [r for r in rows if isinstance(r, HttpRow)]
    if http:
        parts.append("HTTP vs direct (chat requests, AlpacaEval text through the chat template; `vs direct`: output "
                     "tok/s over the direct engine's at the same c; `server CPU us/token`: CPU time of the server "
                     "process, all threads, per output token, and for `kiln direct` of the process driving the "
                     "engine):\n\n" + format_table(http))
    roll = [r for r in rows if isinstance(r, RolloutRow)]
    if roll:
        parts.append("GSM8K generation and GRPO rollouts, before (padded batches) and after the engine:\n\n"
                     + format_rollouts(roll))
    return "\n\n".join(p for p in parts if p)


def _check_args(args: argparse.Namespace) -> str | None:
    """Normalise the comma lists in ``args``; an error message, or None."""
    from kiln.serve.server import parse_overrides

    args.rows = tuple(args.rows.split(",")) if args.rows else ()
    if "compile" in args.rows:  # the old name: the compiled single-step row is now "single-step"
        args.rows = tuple("single-step" if r == "compile" else r for r in args.rows)
    args.parts = tuple(p for p in args.parts.split(",") if p)
    bad = [r for r in args.rows if r not in ROWS] + [p for p in args.parts if p not in PARTS]
    if bad:
        return f"unknown row or part {bad[0]!r}; rows: {','.join(ROWS)}; parts: {','.join(PARTS)}"
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    if not args.concurrency or min(args.concurrency) < 1:
        return f"--concurrency {args.concurrency}: give positive integers, e.g. 1,16,64,256"
    if args.waves < 1:
        return f"--waves {args.waves}: give a positive integer (requests per slot of concurrency; default 8)"
    if args.pairs < 1:
        return f"--pairs {args.pairs}: give a positive integer (1: the direct rows first, then the servers)"
    args.engine_overrides = parse_overrides(args.engine)
    if args.gpt_fast and not Path(args.gpt_fast).is_dir():
        print(f"--gpt-fast {args.gpt_fast} is not a folder; the gpt-fast rows are skipped", file=sys.stderr)
        args.gpt_fast = None
    return None


def run(args: argparse.Namespace) -> int:
    from kiln.bench.report import pick_device, report

    args.started = time.monotonic()
    device = pick_device(args.device)
    err = _check_args(args)
    if err:
        print(err, file=sys.stderr)
        return 2
    if args.threads:  # the same intra-op thread count in-process and in the servers (OMP_NUM_THREADS)
        import torch

        torch.set_num_threads(args.threads)
    default = list(dict.fromkeys(["gpt2_small", largest_preset()])) if device.type == "cuda" else ["preset_tiny"]
    args.shapes_list = args.shapes.split(",") if args.shapes else default
    if "http" in args.parts:
        from kiln.bench.serve_http import check_server_stack

        check_server_stack()  # a missing package fails now, not after the other parts
    rows: list[Any] = []

    def keep(new: list[Any]) -> None:  # each part's rows are on disk as soon as it ends (a killed run keeps them)
        rows.extend(new)
        if args.out:
            from dataclasses import asdict

            from kiln.artifacts import write_json_atomic

            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(args.out) / "bench_serve.partial.json", [asdict(r) for r in rows])

    with tempfile.TemporaryDirectory(prefix="kiln_bench_serve_") as tmp:
        work = Path(tmp)
        # The short rollouts part first and HTTP last: under --budget-s, the part that starts late is
        # the one a skip would cost least (http runs whole once started).
        for shape in args.shapes_list:
            if "latency" in args.parts:
                keep(latency_table(args, shape, device, work))
            if "rollouts" in args.parts:
                keep(rollouts_table(args, shape, device))
            if "throughput" in args.parts:
                keep(throughput_table(args, shape, device, work))
            if "host" in args.parts:
                keep(host_table(args, shape, device))
            if "profile" in args.parts:
                keep(profile_part(args, shape, device, work))
        if "http" in args.parts:
            keep(http_table(args, device, work))
    blurb = (f"Batch-1 greedy decode of {args.new_tokens} tokens after a {args.prompt_len}-token prompt (best of "
             f"{args.repeats}); throughput: at each concurrency c, min({args.requests}, max({args.min_requests}, {args.waves}c)) requests "
             f"(AlpacaEval prompt lengths), {args.max_tokens} greedy output tokens each, c kept in flight; "
             f"rollouts: {args.gsm8k_prompts} GSM8K prompts ({args.gsm8k_shots}-shot) and GRPO groups of "
             f"{args.group}, {args.max_tokens} tokens each; profile: {args.profile_tokens} decode tokens per table. "
             + (f"Rows 'sampled' / 'T=': seeded requests sampled at temperature {args.temperature:g} (top-p "
                f"{args.top_p:g} where named) instead of greedy. " if "sampled" in args.rows else "") + "Weights: "
             + (args.model or "random init (speed does not depend on values)")
             + ("; Kiln's q/k/v and gate/up projections fused" if args.fuse_projections else
                "; Kiln's projections not fused (--no-fuse-projections)") + "; wall "
             f"{time.monotonic() - args.started:.0f} s.")
    report("serve", device, blurb, _tables(rows), rows, args.out)
    return 0 if not any(r.error for r in rows if r.impl.startswith("kiln")) else 1


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``kiln bench serve``."""
    p = bench_subparsers.add_parser(
        "serve", help="the engine's batch-1 decode and throughput vs gpt-fast and transformers, same weights",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shapes", default="", help="comma list of model shapes (gpt2_small, speedrun, 350m, tiny, "
                   "preset_tiny); default on CUDA gpt2_small and Kiln's largest preset (today the same), "
                   "preset_tiny on the CPU")
    p.add_argument("--parts", default="latency,throughput", help=f"some of {','.join(PARTS)}: batch-1 decode; "
                   "engine throughput vs transformers; the HTTP server vs the engine (kiln bench serve-http's "
                   "table); GSM8K generation and GRPO rollouts before/after the engine; the engine's host work "
                   "per decode token (the forward stubbed out); where a decode token's GPU time goes, kernel by kernel, "
                   "Kiln beside gpt-fast (torch.profiler)")
    p.add_argument("--rows", default=",".join(r for r in ROWS if r not in OPT_IN_ROWS),
                   help=f"optional rows, some of {','.join(ROWS)} ('sampled': Kiln's engine sampling at "
                   "--temperature, batch 1 and throughput; 'int8-tuned', 'int4-tuned': Kiln's autotuned "
                   "GEMV kernels at one row too, instead of Inductor's fused form; 'unfused': the bf16 row "
                   "again with q/k/v and gate/up as separate products, beside the fused default; 'one-launch': "
                   "the decode attention kernel also writing the cache and combining its splits, one launch a "
                   "layer instead of three (CUDA, PagedKVCache.decode_write); these five are not in the default)")
    p.add_argument("--model", default=None, help="a trained model directory instead of random weights")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="Kiln's rows (latency, int8/int4 included, throughput, profile, http) with each layer's "
                   "q/k/v and gate/up weights fused into one matrix each, as kiln serve loads a model "
                   "(kiln.model.fuse_projections); --no-fuse-projections: separate, for an A/B")
    p.add_argument("--draft-model", default=None, help="a trained draft model directory for the draft row")
    p.add_argument("--gpt-fast", default=None, metavar="DIR", help="gpt-fast's source folder "
                   "(e.g. ../shared/refs/gpt-fast); without it the gpt-fast rows are skipped")
    p.add_argument("--prompt-len", type=int, default=128, help="batch-1 prompt tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="row 'sampled': the sampled rows' temperature "
                   "(latency and throughput parts)")
    p.add_argument("--top-p", type=float, default=0.95, help="row 'sampled': the latency part's top-p row")
    p.add_argument("--new-tokens", type=int, default=256, help="batch-1 generated tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed batch-1 runs per row (best kept)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="AlpacaEval jsonl for the prompt lengths")
    p.add_argument("--requests", type=int, default=1000, help="most throughput requests per concurrency")
    p.add_argument("--min-requests", type=int, default=16, help="fewest requests per concurrency (c runs "
                   "min(--requests, max(this, waves x c)))")
    p.add_argument("--waves", type=int, default=8, help="requests per slot of concurrency (c runs min(--requests, "
                   "max(--min-requests, waves x c))): longer rows average out more of the run-to-run noise")
    p.add_argument("--concurrency", default="1,16,64,256", help="comma list of requests kept in flight")
    p.add_argument("--pairs", type=int, default=1, help="http part: R > 1 runs a direct row and an HTTP row R "
                   "times in turn at each c (the engine kept loaded beside the server) and reports each pair's "
                   "ratio and their median")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per throughput request")
    p.add_argument("--heldout", default=None, help="held-out text file for the loss column (with --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="the model's Kiln tokenizer (for --heldout); for the http and "
                   "rollouts parts also a folder with GPT-2's vocab.json + merges.txt (default: byte-level)")
    p.add_argument("--heldout-chars", type=int, default=200_000, help="characters of --heldout used")
    p.add_argument("--gsm8k", default="../shared/data/eval/gsm8k/test.jsonl", help="GSM8K jsonl for rollouts")
    p.add_argument("--gsm8k-prompts", type=int, default=64, help="rollouts: GSM8K prompts (GRPO: this many "
                   "sequences, in groups of --group)")
    p.add_argument("--gsm8k-shots", type=int, default=4, help="rollouts: few-shot examples (the file's first items)")
    p.add_argument("--group", type=int, default=8, help="rollouts: GRPO samples per prompt")
    p.add_argument("--rollout-batch", type=int, default=64, help="rollouts: batch size before, running sequences after")
    p.add_argument("--sequential-prompts", type=int, default=8, help="rollouts: prompts of the one-at-a-time row")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=VALUE",
                   help="http part: EngineConfig override for both Kiln rows (repeatable)")
    p.add_argument("--client-procs", type=int, default=4, help="http part: HTTP client processes")
    p.add_argument("--http-row-s", type=float, default=0.0, help="http part: a row sends no request after this "
                   "many seconds (its rate is over the requests that ran; the note says how many); 0: no limit")
    p.add_argument("--server-engine", default="thread,process", help="http part: the Kiln server's engine, "
                   "'thread' (in the server process), 'process' (kiln serve --engine-process) or both")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default; the servers "
                   "get OMP_NUM_THREADS)")
    p.add_argument("--budget-s", type=float, default=0, help="rows not started this many seconds after the start "
                   "are skipped (listed as such); 0: no limit")
    p.add_argument("--profile-tokens", type=int, default=64, help="profile part: decode tokens recorded per table")
    p.add_argument("--profile-tables", choices=("all", "prefill"), default="all", help="profile part: every table, "
                   "or only the prefill steps' (1 and 64 prompts; 64 chat-length, padded and, on CUDA, through "
                   "the Triton prefill kernel)")
    p.add_argument("--profile-init", action="store_true", help="profile part: run torch's "
                   "_init_for_cuda_graphs() (an empty profiler session) before the graphs are captured, the "
                   "workaround torch's docs give for graphs captured before the first profiler use; off by "
                   "default (on CUDA 13 stacks that session is reported to turn kernel tracing off); a table "
                   "with no GPU kernels is measured again in a fresh process with the other setting")
    p.add_argument("--profile-rerun", action="store_true", help=argparse.SUPPRESS)  # the rerun itself: no third try
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default=None, help="directory for bench_serve.md and bench_serve.json (profile part: "
                   "also profile/, the Chrome traces and decode_profile_<shape>.md/.json)")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.serve ...``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.serve")
    add_bench_parser(parser.add_subparsers(dest="bench", required=True))
    return run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
