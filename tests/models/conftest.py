"""Tiny HF checkpoints shared by the model tests, and our model beside HF's for comparisons."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from ccserve.config import EngineConfig
from ccserve.models.loader import load_model
from tests.tiny_models import PagedRunner, make_tiny_model_dir

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_model_dir(family="llama", **config_overrides) -> Path, each distinct checkpoint written once."""
    made: dict[str, Path] = {}

    def make(family: str = "llama", **overrides) -> Path:
        key = f"{family}-{sorted(overrides.items())!r}"
        if key not in made:
            made[key] = make_tiny_model_dir(tmp_path_factory.mktemp(family), family, **overrides)
        return made[key]

    return make


@pytest.fixture
def load_pair(tiny_model_dir) -> Callable[..., tuple[PagedRunner, transformers.PreTrainedModel]]:
    """load_pair(family, **overrides) -> (our model in a PagedRunner, the HF reference), same weights."""

    def load(family: str = "llama", **overrides) -> tuple[PagedRunner, transformers.PreTrainedModel]:
        path = tiny_model_dir(family, **overrides)
        model, _ = load_model(EngineConfig(model=str(path), device="cpu"))
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return PagedRunner(model), hf

    return load
