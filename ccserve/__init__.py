"""ccserve: LLM inference for confidential computing."""
from ccserve.distributed.env import disable_multicast
from ccserve.sampling_params import SamplingParams

# NVLink multicast off in every process that runs ccserve, before anything could initialize NCCL (issue 10).
disable_multicast()

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch models and kernels; import it only when asked for.
    if name == "LLM":
        from ccserve.engine.llm import LLM
        return LLM
    raise AttributeError(name)
