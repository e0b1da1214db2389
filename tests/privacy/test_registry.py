"""The registry classifies every setting exactly once and lists every optimization of the deck's table."""
import argparse
from collections import Counter
from dataclasses import fields
from pathlib import Path

from ccserve.cli import add_server_args
from ccserve.config import EngineConfig, ServerOptions
from ccserve.privacy.registry import FEATURES, NEUTRAL, RULES, Settings, classified

MODEL = str(Path(__file__).parents[2] / "bench" / "models" / "llama3-8b")
SETTINGS = [f.name for f in fields(EngineConfig) + fields(ServerOptions)]
# The seed deck's table (section 5.2/5.3): optimization -> the rules it threatens.
DECK = {"prefix caching": "SE", "disk offload": "SE", "KV duplication": "ST",
        "KV pulling and request migration": "T", "speculative decoding": "S", "priority scheduling": "T",
        "request-level length prediction": "T", "machine-level scheduler": "E", "instance flip": "T",
        "global profiling": "P", "closed-source components": "V"}
# What issue 8 names beyond the deck.
ISSUE = ("KV swap to host", "weight streaming", "LoRA adapters", "per-request tracing or metrics", "debug logging")


def test_every_setting_is_classified():
    missing = [name for name in SETTINGS if name not in classified()]
    assert not missing, (f"settings {missing} are not classified: add them to a Feature's fields or to NEUTRAL "
                         "in ccserve/privacy/registry.py")


def test_registry_names_only_real_settings_each_once():
    assert classified() <= set(SETTINGS)
    counts = Counter([*NEUTRAL, *(name for f in FEATURES for name in f.fields)])
    assert [name for name, n in counts.items() if n > 1] == []


def test_features_are_well_formed():
    names = [f.name for f in FEATURES]
    assert len(names) == len(set(names))
    settings = Settings(EngineConfig(model=MODEL), ServerOptions())
    for f in FEATURES:
        assert f.threatens and set(f.threatens) <= set(RULES), f.name
        assert f.threat and f.mitigation, f.name
        assert f.pcc or f.alternative, f"{f.name}: pcc refuses it, so it must name the safe alternative"
        if not f.present:
            assert not f.fields and not f.enabled(settings), f"{f.name} is absent but has settings"


def test_the_deck_table_and_the_issue_features_are_registered():
    by_name = {f.name: f for f in FEATURES}
    for name, rules in DECK.items():
        assert set(rules) <= set(by_name[name].threatens), name
    assert set(ISSUE) <= set(by_name)


def test_serve_flags_are_exactly_the_server_options():
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in fields(ServerOptions)}
