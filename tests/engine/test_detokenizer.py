import json
import random

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ccserve.engine.detokenizer import IncrementalDetokenizer
from ccserve.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model_dir

PROMPT = "Question: hello"
TEXT = """Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Question: What is the capital of France? Answer: The capital of France is Paris.
The quick brown fox jumps over the lazy dog. The weather today is sunny with a light breeze.
"""
MULTIBYTE_TEXTS = [
    "Héllo wörld, ça va? Ñandú àèìòù",
    "emoji 😀👍🏽 and family 👨‍👩‍👧 in one line 🚀",
    "中文字符 日本語のテキスト 한국어 text",
    "mixed: naïve café — “quotes” … 42 €",
]


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory) -> transformers.PreTrainedTokenizerBase:
    """The project's tiny model tokenizer (byte-level BPE), loaded the way the engine loads it."""
    return transformers.AutoTokenizer.from_pretrained(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def sentencepiece() -> transformers.PreTrainedTokenizerBase:
    """A Llama-2-style tokenizer: "▁" for spaces, byte fallback for unknown characters, and a decoder that
    strips the leading space of the decoded text (what makes one-token-at-a-time decoding lose spaces)."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(params=["byte_bpe", "sentencepiece"])
def tokenizer(request) -> transformers.PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


def stream(tokenizer, output_ids: list[int], prompt_ids: list[int] | None = None,
           **params) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed output_ids one token at a time, then flush; returns the detokenizer and every delta."""
    prompt_ids = encode(tokenizer, PROMPT) if prompt_ids is None else prompt_ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))
    deltas = []
    for token in output_ids:
        deltas.append(detok.append([token]))
        assert detok.text == "".join(deltas)
        if detok.stopped:
            break
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return detok, deltas


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def continuation(tokenizer, output_ids: list[int], skip_special_tokens: bool = True) -> str:
    """What the output adds to the decoded prompt: the reference for a stream. It equals decode(output_ids)
    for byte-level BPE; with sentencepiece it keeps the space that decoding the output alone strips."""
    prompt = tokenizer.decode(encode(tokenizer, PROMPT), skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(encode(tokenizer, PROMPT) + output_ids, skip_special_tokens=skip_special_tokens)
    assert full.startswith(prompt)
    return full[len(prompt):]


def random_output(tokenizer, rng: random.Random) -> list[int]:
    """Random ids mixed with whole multi-byte characters. For byte-level BPE the ids range over the whole
    vocabulary, stray bytes of multi-byte characters included. Sentencepiece's byte-fallback decoder turns
    every byte of an invalid byte run into U+FFFD, so a stray byte retroactively changes the text of valid
    bytes before it, which no stream can foresee; there, byte tokens come only as whole characters."""
    vocab = [i for t, i in tokenizer.get_vocab().items() if not t.startswith("<0x")]
    chars = "".join(MULTIBYTE_TEXTS)
    ids, length = [], rng.randrange(1, 40)
    while len(ids) < length:
        ids += encode(tokenizer, rng.choice(chars)) if rng.random() < 0.2 else [rng.choice(vocab)]
    return ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_sequences_match_full_decode(tokenizer, skip_special_tokens):
    """Random ids include lone bytes of multi-byte characters and special tokens: the stream must still add up
    to exactly what one decode of all ids gives."""
    rng = random.Random(0)
    for _ in range(40):
        ids = random_output(tokenizer, rng)
        _, deltas = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == continuation(tokenizer, ids, skip_special_tokens)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_characters_stream_without_replacement_chars(tokenizer, text):
    ids = encode(tokenizer, text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # characters really are split over tokens
    detok, deltas = stream(tokenizer, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == continuation(tokenizer, ids)
    assert detok.text.strip() == text


def test_sentencepiece_keeps_the_spaces_single_token_decoding_loses(sentencepiece):
    ids = encode(sentencepiece, "the old fisherman and his wife")
    assert "".join(sentencepiece.decode([i]) for i in ids) == "theoldfishermanandhiswife"
    assert stream(sentencepiece, ids)[0].text == " the old fisherman and his wife"


def test_special_tokens_are_skipped_or_shown(byte_bpe):
    ids = encode(byte_bpe, "Hello!") + [byte_bpe.eos_token_id] + encode(byte_bpe, " bye")
    assert stream(byte_bpe, ids)[0].text == "Hello! bye"
    assert stream(byte_bpe, ids, skip_special_tokens=False)[0].text == "Hello!<|im_end|> bye"


def test_decodes_a_small_window_not_the_whole_output(byte_bpe):
    """Each step re-decodes a handful of tokens, however long the output grows."""
    longest = 0

    class Recording:
        def decode(self, ids, **kwargs):
            nonlocal longest
            longest = max(longest, len(ids))
            return byte_bpe.decode(ids, **kwargs)

    ids = encode(byte_bpe, TEXT * 5)
    assert len(ids) > 300
    detok, _ = stream(Recording(), ids, prompt_ids=encode(byte_bpe, "Once upon a time"))
    assert detok.text == byte_bpe.decode(ids) and longest <= 10


def test_stop_string_spanning_tokens(tokenizer):
    text = "The capital of France is Paris. Question: What"
    ids = encode(tokenizer, text)
    full = continuation(tokenizer, ids)
    stop = "is Paris."
    assert len(encode(tokenizer, stop)) > 1
    detok, deltas = stream(tokenizer, ids, stop=[stop])
    assert detok.stopped and detok.stop_reason == stop
    assert detok.text == "".join(deltas) == full[:full.index(stop)]
    assert not any("is" in d for d in deltas)  # no part of the stop string was ever sent

    detok, _ = stream(tokenizer, ids, stop=[stop], include_stop_str_in_output=True)
    assert detok.stopped and detok.text == full[:full.index(stop) + len(stop)]


def test_stop_string_inside_one_token(byte_bpe):
    ids = encode(byte_bpe, "The quick brown fox")
    assert "quick" in [byte_bpe.decode([i]).strip() for i in ids]
    detok, _ = stream(byte_bpe, ids, stop=["ick"])
    assert detok.text == "The qu" and detok.stop_reason == "ick"


def test_holdback_releases_text_once_it_cannot_start_a_stop(byte_bpe):
    """At every step the released text is the decoded text minus its longest suffix that begins a stop string."""
    stops = ["Question:", "sea, there"]
    text = "A Quest in the sea, then Ques and Question"
    ids = encode(byte_bpe, text)
    detok = IncrementalDetokenizer(byte_bpe, [], SamplingParams(stop=stops))
    for n in range(1, len(ids) + 1):
        detok.append([ids[n - 1]])
        decoded = byte_bpe.decode(ids[:n])
        hold = max((k for s in stops for k in range(1, len(s)) if decoded.endswith(s[:k])), default=0)
        assert detok.text == decoded[:len(decoded) - hold], decoded
    assert not detok.stopped and detok.text == "A Quest in the sea, then Ques and "
    assert detok.flush() == "Question" and detok.text == text


def test_first_completed_stop_wins_whatever_the_token_boundaries(byte_bpe):
    """"fox" completes before "brown fox jumps" though the latter starts earlier; one big append and one
    token at a time agree."""
    text = "The quick brown fox jumps"
    params = SamplingParams(stop=["brown fox jumps", "fox"])
    by_token, _ = stream(byte_bpe, encode(byte_bpe, text), stop=params.stop)
    at_once = IncrementalDetokenizer(byte_bpe, [], params)
    at_once.append(encode(byte_bpe, text))
    assert by_token.text == at_once.text == "The quick brown "
    assert by_token.stop_reason == at_once.stop_reason == "fox"


def test_flush_checks_stops_in_a_trailing_partial_character(byte_bpe):
    ids = encode(byte_bpe, "ok 😀")[:-1]  # the emoji's last byte never comes
    detok, deltas = stream(byte_bpe, ids, stop=["\ufffd"])
    assert detok.stopped and detok.text == "ok "


def test_nothing_after_a_stop(byte_bpe):
    detok = IncrementalDetokenizer(byte_bpe, [], SamplingParams(stop=["fox"]))
    assert detok.append(encode(byte_bpe, "The fox")) == "The "
    assert detok.append(encode(byte_bpe, " jumps")) == "" and detok.flush() == ""
    assert detok.text == "The "
