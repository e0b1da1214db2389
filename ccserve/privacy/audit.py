"""`ccserve audit`: the seed deck's table (which optimization threatens which PCC rule), computed from the
registry for one effective configuration, as text or JSON.

Why a command and not a document: the table is only true of the configuration it was computed for, so the
operator runs it on the very settings (file and flags) the node will be started with. The verdict is the
policy's own (`check`), so the audit and the refusal at start can never disagree. Exit status: 1 when the
chosen policy refuses something, 0 otherwise (under `open` the threats are reported, not refused).
"""
from __future__ import annotations

import json
import textwrap
from dataclasses import fields
from pathlib import Path

from ccserve.config import EngineConfig, ServerOptions
from ccserve.privacy.policy import ABSENT, OFF, REFUSED, UNSAFE, Finding, check
from ccserve.privacy.registry import NEUTRAL, RULES, SERVER_SETTINGS, Settings

_SETTING_TYPES = {f.name: str(f.type) for f in fields(EngineConfig) + fields(ServerOptions)}
_JSON_TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number"),
               "bool": (bool, "true or false"), "dict": (dict, "an object"), "None": (type(None), "null")}
_WIDTH = 118


def load_config_file(path: str) -> tuple[dict, dict]:
    """(engine settings, server settings) from a JSON object of setting names to values. Every mistake is a
    ValueError naming the file and the setting: the file is what an operator deploys."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"the audit config file {path!r} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the audit config file {path!r} does not parse as JSON: {exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the audit config file {path!r} must hold a JSON object of setting names to values")
    engine, server = {}, {}
    for name, value in data.items():
        if name not in _SETTING_TYPES:
            raise ValueError(f"the audit config file {path!r} has an unknown setting {name!r}; known settings: "
                             f"{', '.join(sorted(_SETTING_TYPES))}")
        _check_type(path, name, value)
        (server if name in SERVER_SETTINGS else engine)[name] = value
    return engine, server


def report(config: EngineConfig, server: ServerOptions | None) -> dict:
    """The audit as plain data (what --json prints): every feature's verdict, the neutral settings, and one
    sentence per feature the policy refuses or only `open` allows."""
    findings = check(config, server)
    settings = Settings(config, server)
    unsafe = [f for f in findings if f.verdict in (REFUSED, UNSAFE)]
    return dict(
        policy=config.privacy, ok=not any(f.refused for f in findings), model=config.model,
        features=[_feature_row(f) for f in findings],
        neutral={name: dict(value=settings.get(name), why=why) for name, why in NEUTRAL.items()},
        messages=[f.sentence() for f in unsafe])


def render_json(result: dict) -> str:
    return json.dumps(result, indent=1, default=repr)


def render_text(result: dict) -> str:
    """The table, then the neutral settings, the sentences about unsafe features and the outcome. The
    mitigation column is what is in force; for an absent feature, what building it must put in force."""
    lines = [f"ccserve audit: policy {result['policy']}, model {result['model']}",
             " · ".join(f"{r} {name}" for r, name in RULES.items()), "",
             f"{'VERDICT':<8} {'RULES':<5} {'FEATURE':<33} MITIGATION"]
    indent = " " * 49
    for row in result["features"]:
        head = f"{row['verdict']:<8} {''.join(row['threatens']):<5} {row['name']:<33} "
        lines += textwrap.wrap(row["mitigation"], _WIDTH, initial_indent=head, subsequent_indent=indent)
    neutral = ", ".join(f"{name}={entry['value']!r}" for name, entry in result["neutral"].items())
    lines += ["", *textwrap.wrap(f"Settings that touch no rule: {neutral}.", _WIDTH)]
    for message in result["messages"]:
        lines += ["", *textwrap.wrap(message, _WIDTH, initial_indent="- ", subsequent_indent="  ")]
    lines += ["", _outcome(result)]
    return "\n".join(lines)


def _outcome(result: dict) -> str:
    refused = sum(row["verdict"] == REFUSED for row in result["features"])
    unsafe = sum(row["verdict"] == UNSAFE for row in result["features"])
    if refused:
        return f"Result: the pcc policy refuses {refused} feature(s); the node would not start (exit status 1)."
    if unsafe:
        return f"Result: accepted under {result['policy']}, with {unsafe} feature(s) that pcc would refuse."
    return f"Result: accepted under {result['policy']}."


def _feature_row(finding: Finding) -> dict:
    f = finding.feature
    return dict(name=f.name, present=f.present, enabled=finding.verdict not in (ABSENT, OFF),
                threatens=list(f.threatens), threat=f.threat, settings=finding.values,
                mitigation=f.mitigation, allowed_under_pcc=f.pcc, alternative=f.alternative or None,
                verdict=finding.verdict)


def _check_type(path: str, name: str, value: object) -> None:
    allowed = [t.strip() for t in _SETTING_TYPES[name].split("|")]
    ok = any(isinstance(value, _JSON_TYPES[t][0]) for t in allowed)
    if ok and isinstance(value, bool) and "bool" not in allowed:
        ok = False  # JSON true is a Python int; it is not a number of sequences
    if not ok:
        expected = " or ".join(_JSON_TYPES[t][1] for t in allowed)
        raise ValueError(f"the audit config file {path!r} sets {name!r} to {value!r}, but it must be {expected}")
