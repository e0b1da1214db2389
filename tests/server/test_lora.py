"""Multi-LoRA over real HTTP on loopback: the OpenAI `model` field selects an adapter, /v1/models lists the
adapters with their base, an unknown name is a 404 naming the model field, and /metrics counts adapter loads."""
from __future__ import annotations

import httpx
import openai
import pytest

from ccserve import LLM, SamplingParams
from tests.lora.adapters import make_adapter
from tests.server.conftest import MODEL, metric, start_server

IDS = [17, 42, 99, 123, 7, 256]


@pytest.fixture(scope="module")
def lora_server(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    adapters = {"tuned": str(make_adapter(tiny_model_path, root / "tuned", seed=1)),
                "other": str(make_adapter(tiny_model_path, root / "other", seed=2, targets=["q_proj", "v_proj"]))}
    live = start_server(tiny_model_path, max_model_len=128, num_gpu_blocks=32, lora_adapters=adapters, max_loras=1)
    yield live, adapters
    live.stop()


def test_model_field_selects_the_adapter(lora_server, tiny_model_path) -> None:
    live, adapters = lora_server
    llm = LLM(str(tiny_model_path), max_model_len=128, num_gpu_blocks=32, lora_adapters=adapters)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    client = live.client()
    for name in ("tuned", "other", MODEL):
        out = client.completions.create(model=name, prompt=IDS, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        expect = llm.generate([IDS], params, lora=None if name == MODEL else name)[0].text
        assert out.model == name and out.choices[0].text == expect, name
    chat = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "tuned" and chat.choices[0].message.content is not None
    text = httpx.get(f"{live.base_url}/metrics").text
    assert metric(text, "ccserve_lora_adapter_loads_total") >= 3       # one slot: "tuned" came back after "other"
    live.wait_idle()


def test_models_lists_adapters(lora_server) -> None:
    live, _ = lora_server
    cards = {m.id: m for m in live.client().models.list().data}
    assert set(cards) == {MODEL, "tuned", "other"}
    assert cards["tuned"].model_extra["parent"] == MODEL and cards[MODEL].model_extra["parent"] is None


def test_unknown_adapter_is_a_404_on_the_model_field(lora_server) -> None:
    live, _ = lora_server
    with pytest.raises(openai.NotFoundError) as caught:
        live.client().completions.create(model="nope", prompt="hi", max_tokens=2)
    error = caught.value.body
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "'tuned'" in error["message"] and "'other'" in error["message"]
