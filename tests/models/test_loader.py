"""Loading: safetensors layouts, the checks that keep a half-loaded model from serving, dummy weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ccserve.config import EngineConfig
from ccserve.layers.norm import RMSNorm
from ccserve.models.loader import load_model, read_hf_config
from tests.tiny_models import PagedRunner, hf_logits, make_tiny_model, make_tokenizer


@pytest.fixture
def llama_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "llama"))


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def _edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))


def _load(path: Path, **kw):
    return load_model(EngineConfig(model=str(path), device="cpu", **kw))


def test_model_is_built_in_the_compute_dtype(tiny_model_dir):
    model, hf_config = _load(tiny_model_dir("qwen3"), dtype="bfloat16")
    assert hf_config.architectures == ["Qwen3ForCausalLM"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].self_attn.rotary_emb.cos_sin.dtype == torch.float32
    assert not model.training


def test_sharded_checkpoint_with_index_loads(tmp_path):
    hf = make_tiny_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    make_tokenizer().save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "consolidated.safetensors").write_bytes(b"not listed in the index, so never read")
    model, _ = _load(tmp_path)
    prompt = list(range(10, 30))
    logits = PagedRunner(model).step([], [(0, prompt)])[0]
    torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=1e-4, rtol=0)


def test_ignorable_and_redundant_tensors_are_skipped(tiny_model_dir, tmp_path):
    path = Path(shutil.copytree(tiny_model_dir("llama", tie_word_embeddings=True), tmp_path / "tied"))

    def add_extras(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()  # some tied checkpoints store the head
    _edit_weights(path, add_extras)
    _load(path)


def test_missing_weight_is_named(llama_dir):
    _edit_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 parameter.*layers\.1\.mlp\.gate_up_proj\.weight \(part 2\)"):
        _load(llama_dir)


def test_untied_model_without_lm_head_is_incomplete(llama_dir):
    _edit_weights(llama_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        _load(llama_dir)


def test_unknown_tensor_is_named(llama_dir):
    _edit_weights(llama_dir, lambda t: t.update({"model.layers.0.self_attn.c_attn.weight": torch.zeros(2, 2)}))
    with pytest.raises(ValueError, match="c_attn.weight.*matches no parameter of LlamaForCausalLM"):
        _load(llama_dir)


def test_shape_mismatch_names_config(llama_dir):
    _edit_config(llama_dir, intermediate_size=96)
    with pytest.raises(ValueError, match="has shape .* config.json does not match"):
        _load(llama_dir)


def test_missing_safetensors_suggests_dummy(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*load_format='dummy'"):
        _load(llama_dir)


def test_unsupported_architecture(llama_dir):
    _edit_config(llama_dir, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification is not supported.*LlamaForCausalLM"):
        _load(llama_dir)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_hf_config(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no config.json"):
        read_hf_config(str(tmp_path))


def test_sliding_window_is_refused_unless_it_never_slides(tiny_model_dir):
    path = tiny_model_dir("mistral", sliding_window=64)
    with pytest.raises(ValueError, match=r"sliding_window=64.*max_model_len <= 64"):
        _load(path)
    _load(path, max_model_len=64)


def test_qwen2_sliding_window_layers_are_refused(tiny_model_dir):
    path = tiny_model_dir("qwen2", use_sliding_window=True, sliding_window=128, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding_window=128"):
        _load(path)


def test_dummy_weights_are_small_deterministic_and_usable(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    model, _ = _load(llama_dir, load_format="dummy", seed=7)
    again, _ = _load(llama_dir, load_format="dummy", seed=7)
    other, _ = _load(llama_dir, load_format="dummy", seed=8)
    for (name, p), q, r in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), name
        if isinstance(model.get_submodule(name.rpartition(".")[0]), RMSNorm):
            assert torch.all(p == 1), name
        else:
            assert p.abs().max() <= 1e-3 and not torch.equal(p, r), name
    logits = PagedRunner(model).step([], [(0, [1, 2, 3])])[0]
    assert torch.isfinite(logits).all()


def test_dummy_opt_layer_norms_are_identity(tiny_model_dir):
    model, _ = _load(tiny_model_dir("opt"), load_format="dummy")
    norm = model.model.decoder.layers[0].self_attn_layer_norm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
