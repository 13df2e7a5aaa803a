#!/usr/bin/env bash
# The GPU measurements issue 19 still owes (docs/benchmarks.md says which and why), as sections that
# fit one 10-minute call on one H100 with no network. Two steps:
#
#   bash scripts/gpu_owed.sh prep        # here, with ../shared and PyPI: fills .devcarry/ and .whl/ (~12 MB)
#   PART="kv prof" bash scripts/gpu_owed.sh      # there (carry .devcarry and .whl); output under $OUT
#
# Sections (PART, space-separated; each under its own time limit in seconds, env var in brackets).
# A Kiln row costs ~1-1.5 min of compile at 350m, a gpt-fast row ~1.5 min: size calls by rows, not tokens.
#   kv      batch-1 bf16 decode with the cache write as kiln::kv_write (default) and as index_copy_
#           (row index-copy), beside gpt-fast, at 350m then 124M [K=420]
#   q1b     int8 / int4 / n-gram speculation and gpt-fast's bf16 and int8 on the 1b shape (16 x d2048),
#           where a GEMV is bound by bytes: the quantization goals [Q=540, a call of its own]
#   quant   the 1b shape's int8 / int4 beside Kiln's autotuned GEMV kernels at one row (rows
#           int8-tuned, int4-tuned: bit-trick dequantization, tile chosen by timing) [U=540, own call]
#   q7b     bf16 / int8 / int4 on Llama-2-7B's shape (32 x d4096, 6.7B, built on the device), where
#           gpt-fast reports its int8/int4 speed-ups: the quantization goals at the size they are
#           meant for [V=560, own call]; q7bt: the same with the tuned GEMVs [own call]; g7b:
#           gpt-fast bf16 and int8 at 7b [own call]
#   prof    where a 350m decode token's GPU time goes, Kiln (graphs, no graph, n-gram verify steps,
#           general steps admitting 1 and 64 prompts, and 64 chat-length ones with one long, padded and
#           through the Triton prefill kernel) beside gpt-fast [P=300]; PSHAPE=7b: the same at 7b, where
#           the non-GEMV share of a token sets how much int8/int4 can buy
#   fused   batch-1 bf16 decode with q/k/v and gate/up fused (kiln serve's default now) beside the same
#           model unfused, and beside the decode attention kernel writing the cache and combining its
#           splits itself (one launch a layer, PagedKVCache.decode_write), at FSHAPES (gpt2_small,350m) [F=420]
#   gemv    batch-1 decode GEMVs alone at 7b and 350m shapes: bf16 (cuBLAS), Kiln's int8/int4 (fixed,
#           tuned), Inductor's one-row forms, in GB/s beside the copy bandwidth; and every tile of the
#           int8 kernel and the int4 word kernel (--gemv-sweep; GS=0 leaves it out) [G=400]
#   http    HTTP vs direct and vs `transformers serve` at concurrency 64 / 256, 16 waves a row (1,000
#           requests at c=64), each Kiln row noting the engine's lean and general steps (mean ms,
#           prompt tokens) and its busy share over the row [H=420]
#   wait    the http section's c=64 rows (no transformers serve) with EngineConfig.admission_wait_ms=4:
#           arrivals batched into fewer general steps; compare with the http section [W=300]
#   mixed   the wait section's rows with EngineConfig.mixed_steps=true, then false, in one call: arrivals
#           prefilled beside the lean multi-step decode instead of general steps [X=270 each]
#   prefill the Triton prefill kernel's tests on the GPU, `kiln bench kernels --kernels paged_prefill`
#           (the kernel against the padded paths on a chat wave and like-length prompts) [KB=120], the
#           prefill steps' profile at GPT-2-small (kernel time against wall: GPU- or host-bound?) [PP=150]
#   phttp   HTTP c=64 (1,000 requests) with
#           prefill_kernel and mixed_steps true/true, true/false, false/false (the old default), the
#           engine in its own process (kiln serve's default), 2 pairs of direct and HTTP rows in turn
#           (--pairs 2: each HTTP row over its own pair's direct row) [R=140 each]
#   sampled sampled decode (T 0.7, top-p 0.95): batch 1 and throughput [S=240]
#   procs   batch-1 sampled decode beside the same with penalties and min-p (the '+proc' graphs, K steps)
#           and in JSON mode (the host's grammar mask each token, one step a replay) [PR=300]
#   learn   GRPO learning per GPU-second vs trl's GRPOTrainer, and DPO on hh-rlhf [L=240]
# Measured on 2026-12-07 and no longer owed: same-run gpt-fast at 124M and 350m, n-gram speculation,
# int8/int4 at 350m and 1b, kiln::kv_write (section kv), sampled decode, HTTP at c=16/64/256 four
# times, q7b with the tuned rows (ROWS=int8,int4,int8-tuned,int4-tuned), mixed (docs/benchmarks.md).
# Measured late on 2026-12-07: prefill and phttp (the Triton prefill kernel, now the default).
# Still owed, in order of value (2026-12-08: about a dozen attempts got no machine):
#   1. PART="prefill gemv" (T=60 G=400): the one-launch decode attention's GPU tests, then every GEMV form
#      alone; 2. fused (the fused projections and the one-launch attention beside the default; if the
#      tests pass and it is faster, PagedKVCache.decode_write -> True); 3. q7b with ROWS=int8-tuned,int4-tuned
#      (the new forms end to end) and g7b; 4. phttp CFGS="true false" (HTTP >= 90% again); 5. procs (the
#      penalties' and JSON mode's cost; the prefill section's tests cover their graphs); then quant,
#      prof (PSHAPE=7b), kv, http, wait, learn. The session's budget is 1,800 s and a machine's start
#      costs ~90 s (a failed start too).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prep" ]; then
    set -e
    mkdir -p .devcarry/gpt2 .devcarry/hh-rlhf/harmless-base
    for x in /.devcarry/ /.whl/; do grep -qx "$x" .git/info/exclude || echo "$x" >> .git/info/exclude; done
    rm -rf .devcarry/gpt-fast && cp -r ../shared/refs/gpt-fast .devcarry/gpt-fast
    cp ../shared/data/align/alpaca_eval/alpaca_eval.jsonl .devcarry/
    cp ../shared/data/tokenizers/gpt2/vocab.json ../shared/data/tokenizers/gpt2/merges.txt .devcarry/gpt2/
    cp ../shared/data/align/hh-rlhf/harmless-base/test.jsonl.gz .devcarry/hh-rlhf/harmless-base/
    head -n 64 ../shared/data/eval/gsm8k/test.jsonl > .devcarry/gsm8k_test64.jsonl
    # what the GPU image holds (the device tool's KINDS.md lists it); skipped unless named as a root
    image=${IMAGE_PACKAGES:-.devcarry/image_packages.txt}
    [ -f "$image" ] || { echo "write the image's package names, one per line, to $image (or set IMAGE_PACKAGES)"; exit 2; }
    py=${PYTHON:-.venv/bin/python}  # the environment whose versions are shipped (make test builds it)
    "$py" scripts/offline_wheels.py trl datasets zstandard fastapi uvicorn httptools openai typer rich anyio idna \
        typing-extensions --skip-file "$image" -d .whl
    du -sh .devcarry .whl
    exit 0
fi

: "${OUT:=runs/gpu_owed}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 3
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
kiln() { python3 -m kiln.cli.main "$@"; }
export -f kiln  # timeout runs a command, not a function: sections call it through bash -c
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

section() {  # name, seconds, command...: run under a limit, keep the log, say how it ended
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    timeout "$limit" bash -c '"$@"' _ "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name: exit $? $(date -u +%H:%M:%S)"
    grep -E '^\||^\*\*|tok/s|bound|GRPO mean|^\[learning\]' "$OUT/$name.log" | cut -c1-400 | tail -40
}

for part in ${PART:-kv}; do
    case $part in
    kv) section kv "${K:-420}" kiln bench serve --device cuda --parts latency --shapes 350m,gpt2_small \
                --rows index-copy,gpt-fast --gpt-fast .devcarry/gpt-fast --new-tokens 256 --prompt-len 128 \
                --repeats 2 --out "$OUT/kv" ;;
    q1b) section q1b "${Q:-540}" kiln bench serve --device cuda --parts latency --shapes 1b \
                --rows int8,int4,ngram,gpt-fast,gpt-fast-int8 --gpt-fast .devcarry/gpt-fast --new-tokens 256 \
                --prompt-len 128 --repeats 2 --out "$OUT/q1b" ;;
    quant) section quant "${U:-540}" kiln bench serve --device cuda --parts latency --shapes 1b \
                --rows int8,int4,int8-tuned,int4-tuned --new-tokens 256 --prompt-len 128 --repeats 2 \
                --out "$OUT/quant" ;;
    q7b|q7bt|g7b)
        case $part in q7b) rows=int8,int4 ;; q7bt) rows=int8-tuned,int4-tuned ;; g7b) rows=gpt-fast,gpt-fast-int8 ;; esac
        rows=${ROWS:-$rows}  # ROWS overrides the section's rows (q7b with ROWS=int8,int4,int8-tuned,int4-tuned)
        section "$part" "${V:-560}" kiln bench serve --device cuda --parts latency --shapes 7b --rows "$rows" \
                --gpt-fast .devcarry/gpt-fast --new-tokens 128 --prompt-len 128 --repeats 2 --out "$OUT/$part" ;;
    fused) section fused "${F:-420}" kiln bench serve --device cuda --parts latency --shapes "${FSHAPES:-gpt2_small,350m}" \
                --rows unfused,one-launch --new-tokens 256 --prompt-len 128 --repeats 2 --out "$OUT/fused" ;;
    gemv) sweep=(--gemv-sweep); [ "${GS:-1}" = 0 ] && sweep=()  # GS=0: the named rows only (tuned = every form)
        section gemv "${G:-400}" kiln bench kernels --kernels gemv ${sweep[@]+"${sweep[@]}"} --out "$OUT/gemv" ;;
    prof) gf=(--gpt-fast .devcarry/gpt-fast)
        [ "${PSHAPE:-350m}" = 7b ] && gf=()  # gpt-fast's 7b conversion alone would take the call
        section prof "${P:-300}" kiln bench serve --device cuda --parts profile --shapes "${PSHAPE:-350m}" \
                ${gf[@]+"${gf[@]}"} --prompt-len 128 --profile-tokens 64 --out "$OUT/prof" ;;
    http) section http "${H:-420}" kiln bench serve --device cuda --shapes gpt2_small --parts http \
                --rows transformers-serve --http-row-s 15 --prompts .devcarry/alpaca_eval.jsonl \
                --tokenizer .devcarry/gpt2 --requests 1000 --concurrency 64,256 --min-requests 8 --waves 16 \
                --max-tokens 128 --client-procs 4 --server-engine thread,process --out "$OUT/http" ;;
    wait) section wait "${W:-300}" kiln bench serve --device cuda --shapes gpt2_small --parts http \
                --rows ngram --prompts .devcarry/alpaca_eval.jsonl --tokenizer .devcarry/gpt2 --requests 1000 \
                --concurrency 64 --min-requests 8 --waves 16 --max-tokens 128 --client-procs 4 \
                --server-engine thread,process --engine admission_wait_ms=4 --out "$OUT/wait" ;;
    mixed) for m in true false; do  # the same rows with and without mixed steps, one call
            section "mixed_$m" "${X:-270}" kiln bench serve --device cuda --shapes gpt2_small --parts http \
                --rows ngram --prompts .devcarry/alpaca_eval.jsonl --tokenizer .devcarry/gpt2 --requests 1000 \
                --concurrency 64 --min-requests 8 --waves 16 --max-tokens 128 --client-procs 4 \
                --server-engine thread,process --engine mixed_steps=$m --out "$OUT/mixed_$m"
        done ;;
    prefill) section prefill_test "${T:-120}" python3 -m pytest -q -p no:cacheprovider tests/kernels/test_paged_attention.py \
                tests/generate/test_processors.py tests/generate/test_structured.py \
                -k "prefill or bf16 or mixed or own_write or traced or last_program or one_launch or real_cuda"
        section prefill_kernel_bench "${KB:-120}" kiln bench kernels --kernels paged_prefill --out "$OUT/kernels"
        section prefill_prof "${PP:-150}" kiln bench serve --device cuda --parts profile --profile-tables prefill \
                --shapes gpt2_small --prompt-len 128 --out "$OUT/prefill_prof" ;;
    phttp) IFS=, read -ra cfgs <<< "${CFGS:-true true,true false,false false}"
        for cfg in "${cfgs[@]}"; do  # prefill_kernel, mixed_steps (CFGS: a comma list of such pairs)
            set -- $cfg
            section "prefill_$1_mixed_$2" "${R:-140}" kiln bench serve --device cuda --shapes gpt2_small --parts http \
                --rows ngram --prompts .devcarry/alpaca_eval.jsonl --tokenizer .devcarry/gpt2 --requests 1000 \
                --concurrency 64 --min-requests 8 --waves 16 --max-tokens 128 --client-procs 4 \
                --server-engine process --pairs 2 --engine prefill_kernel=$1 --engine mixed_steps=$2 \
                --out "$OUT/prefill_$1_mixed_$2"
        done ;;
    sampled) section sampled "${S:-240}" kiln bench serve --device cuda --shapes gpt2_small \
                --parts latency,throughput --rows sampled --temperature 0.7 --top-p 0.95 --new-tokens 256 \
                --prompt-len 128 --repeats 2 --prompts .devcarry/alpaca_eval.jsonl --requests 512 \
                --concurrency 1,16,64,256 --min-requests 8 --max-tokens 128 --budget-s 200 --out "$OUT/sampled" ;;
    procs) section procs "${PR:-300}" kiln bench serve --device cuda --shapes gpt2_small --parts latency \
                --rows sampled,penalties,structured --temperature 0.7 --top-p 0.95 --new-tokens 256 \
                --prompt-len 128 --repeats 2 --tokenizer .devcarry/gpt2 --budget-s 260 --out "$OUT/procs" ;;
    learn) section learn "${L:-240}" kiln bench align --learning --size small --device cuda \
                --hh-rlhf .devcarry/hh-rlhf/harmless-base/test.jsonl.gz --gsm8k .devcarry/gsm8k_test64.jsonl \
                --out "$OUT/learning" ;;
    *) echo "unknown section $part (kv q1b quant q7b q7bt g7b fused gemv prof http wait mixed prefill phttp sampled learn)"; exit 2 ;;
    esac
done
