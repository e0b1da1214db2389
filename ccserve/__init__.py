"""ccserve: LLM inference for confidential computing."""
from ccserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch models and kernels; import it only when asked for.
    if name == "LLM":
        from ccserve.engine.llm import LLM
        return LLM
    raise AttributeError(name)
