import pytest
import transformers

from ccserve.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from ccserve.models.opt import OPTForCausalLM
from ccserve.models.registry import SUPPORTED_ARCHITECTURES, get_model_class


@pytest.mark.parametrize("cls", [LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
                                 OPTForCausalLM])
def test_architecture_selects_its_class(cls):
    assert get_model_class(transformers.PretrainedConfig(architectures=[cls.__name__])) is cls


def test_unknown_architecture_is_named_with_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported") as err:
        get_model_class(transformers.PretrainedConfig(architectures=["GPT2LMHeadModel"]))
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


def test_config_without_architectures_is_refused():
    with pytest.raises(ValueError, match="no 'architectures'"):
        get_model_class(transformers.PretrainedConfig())
