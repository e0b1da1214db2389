"""Tiny random HF models with a real (tiny) tokenizer, written to a directory like a downloaded checkpoint.

Tests of every layer above the models compare against HF transformers on these: they load in well under a
second, run on the CPU in float32, and are deterministic (fixed seed, fixed tokenizer training text). The
tokenizer is a byte-level BPE trained on the text below, so any string round-trips, and it carries a ChatML
chat template so chat requests can be tested end to end.

PagedRunner drives one of our models the way the engine does (paged KV cache, steps mixing decodes and prefill
chunks) but without it, so model tests can compare logits with HF step by step.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from ccserve.layers.attention import AttentionMetadata

BOS, EOS, PAD, IM_START = "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
SPECIAL_TOKENS = [BOS, PAD, IM_START, EOS]
TOKENIZER_VOCAB_SIZE = 512
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. Every morning
he went out in his little boat, and every evening he came back with a basket of fish for the market.
The weather today is sunny with a light breeze from the west. Tomorrow there will be rain in the morning
and clouds in the afternoon, so remember to bring an umbrella when you leave the house.
Machine learning models learn patterns from data. A language model predicts the next word in a sentence,
one token at a time, using everything it has read so far. Large models need a lot of memory, and serving
them quickly means keeping the graphics processor busy with many requests at once.
Question: What is the capital of France? Answer: The capital of France is Paris.
Question: How many days are there in a week? Answer: There are seven days in a week.
Question: What color is the sky on a clear day? Answer: The sky is blue on a clear day.
She opened the window and looked at the garden. The roses were red, the violets were blue, and the grass
was still wet from the night. A cat was sleeping under the old apple tree, and two birds were singing.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.
Hello! How are you doing today? I am fine, thank you. Could you please tell me the way to the station?
Of course. Walk straight ahead, turn left at the bank, and you will see the station on your right.
The history of science is full of surprises. People once believed that the sun moved around the earth,
until careful observers showed that the earth moves around the sun. Good ideas often start as questions.
Write a short poem about the ocean. The ocean sings a quiet song, of waves that travel far and long.
Cooking rice is simple: wash the rice, add water, bring it to a boil, then let it cook slowly with the
lid on for about fifteen minutes. Let it rest for five more minutes before you serve it.
In the library there were thousands of books about history, music, art, mathematics and the stars.
The children ran to the park after school, laughing and shouting, while their parents talked nearby.
def add(a, b):
    return a + b

print("hello, world")
for i in range(10):
    print(i * i)
Privacy matters. Data that belongs to a user should be used only for that user's request, and then
it should be gone. Encryption keeps information safe while it travels between machines.
"""


@functools.cache
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (it is the slow part) and reuse its serialized form."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TEXT.splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny tokenizer: BOS/EOS/PAD special tokens, ChatML template, EOS = <|im_end|>."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START], chat_template=CHATML_TEMPLATE)


def _config(family: str, tokenizer: transformers.PreTrainedTokenizerFast,
            overrides: dict) -> transformers.PretrainedConfig:
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    # A wider init than HF's 0.02 keeps greedy argmax far from ties, so token-for-token comparisons are stable.
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                  initializer_range=0.1, **ids)
    decoder = dict(common, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    if family == "llama":
        kwargs, cls = decoder, transformers.LlamaConfig
    elif family == "mistral":
        kwargs, cls = dict(decoder, sliding_window=None), transformers.MistralConfig
    elif family == "qwen2":
        kwargs, cls = dict(decoder, use_sliding_window=False), transformers.Qwen2Config
    elif family == "qwen3":  # head_dim != hidden / heads, as in real Qwen3 checkpoints
        kwargs, cls = dict(decoder, head_dim=32), transformers.Qwen3Config
    elif family == "opt":
        kwargs = dict(common, ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True)
        kwargs["init_std"] = kwargs.pop("initializer_range")
        cls = transformers.OPTConfig
    else:
        raise ValueError(f"unknown tiny model family {family!r}: use llama, mistral, qwen2, qwen3 or opt")
    return cls(**{**kwargs, **overrides})


def make_tiny_model(family: str = "llama", **config_overrides) -> transformers.PreTrainedModel:
    """A tiny random HF model (float32, eval mode). 1-D parameters (norms, biases) are randomized too, so a
    loader that drops them or swaps them cannot pass a logits comparison."""
    config = _config(family, make_tokenizer(), config_overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                center = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(center + 0.1 * torch.randn_like(p))
    return model.eval()


def make_tiny_model_dir(path: str | Path, family: str = "llama", **config_overrides) -> Path:
    """Write a tiny random `family` model (llama, mistral, qwen2, qwen3, opt) and its tokenizer to `path`.

    config_overrides replace fields of the HF config (e.g. tie_word_embeddings=True, rope_scaling=...).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_model(family, **config_overrides).save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


class PagedRunner:
    """The model-facing half of an engine, for tests: a paged KV cache with deliberately scattered blocks,
    and steps of decodes (first) plus prefill chunks, each returning the logits of every token it ran."""

    def __init__(self, model: nn.Module, block_size: int = 4, num_blocks: int = 96) -> None:
        self.model, self.block_size = model, block_size
        param = next(model.parameters())
        for layer in model.attention_layers():
            shape = (num_blocks, layer.num_kv_heads, block_size, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=param.dtype, device=param.device)
            layer.v_cache = torch.zeros_like(layer.k_cache)
        self.device = param.device
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()  # scattered
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    @torch.inference_mode()
    def step(self, decodes: list[tuple[int, int]], prefills: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """decodes: (seq, token); prefills: (seq, tokens of the next chunk). Returns each item's logits [n, V]."""
        items = [(s, [t]) for s, t in decodes] + prefills
        ids, positions, slots, seq_lens, tables = [], [], [], [], []
        for seq, tokens in items:
            start = self.lens.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop(0))
            ids += tokens
            positions += range(start, end)
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)]
            seq_lens.append(end)
            tables.append(table)
            self.lens[seq] = end
        nd = len(decodes)
        q_lens = [len(tokens) for _, tokens in prefills]
        i32, dev = torch.int32, self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev), num_decode_tokens=nd,
            decode_seq_lens=torch.tensor(seq_lens[:nd], dtype=i32, device=dev),
            decode_block_tables=_pad(tables[:nd]).to(dev),
            prefill_cu_seqlens_q=torch.tensor([0] + q_lens, device=dev).cumsum(0).to(i32),
            prefill_seq_lens=torch.tensor(seq_lens[nd:], dtype=i32, device=dev),
            prefill_block_tables=_pad(tables[nd:]).to(dev), max_prefill_query_len=max(q_lens, default=0))
        hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), meta)
        logits = self.model.compute_logits(hidden)
        return list(logits.split([len(tokens) for _, tokens in items]))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding: all prompts prefilled in one step, then every sequence decoded together."""
        last = [logits[-1] for logits in self.step([], list(enumerate(prompts)))]
        out = [[int(x.argmax())] for x in last]
        for _ in range(max_new_tokens - 1):
            last = [logits[-1] for logits in self.step([(s, toks[-1]) for s, toks in enumerate(out)], [])]
            for toks, x in zip(out, last):
                toks.append(int(x.argmax()))
        return out


def _pad(tables: list[list[int]]) -> torch.Tensor:
    width = max((len(t) for t in tables), default=1)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).view(len(tables), width)


@torch.inference_mode()
def hf_logits(hf: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """HF's logits for every position of one unpadded sequence."""
    return hf(torch.tensor([tokens], device=hf.device)).logits[0].float()
