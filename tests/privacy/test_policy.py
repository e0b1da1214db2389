"""`pcc` refuses each unsafe setting with a sentence naming the rule, the setting and the safe alternative;
`open` runs it and the audit still reports the threat."""
from pathlib import Path

import pytest

from ccserve.config import EngineConfig, ServerOptions
from ccserve.privacy.audit import report
from ccserve.privacy.policy import ALLOWED, OFF, REFUSED, UNSAFE, PolicyViolation, check, enforce

MODEL = str(Path(__file__).parents[2] / "bench" / "models" / "llama3-8b")  # config.json only: nothing loads

# feature, engine settings, server settings, rule names the sentence must give, the setting, the alternative
UNSAFE_SETTINGS = [
    ("dummy weights", dict(load_format="dummy"), None,
     ["enforceable guarantees (E)", "verifiable transparency (V)"], "load_format='dummy'", "load_format 'auto'"),
    ("unclassified extra settings", dict(extra={"trace_prompts": True}), None,
     ["enforceable guarantees (E)"], "extra={'trace_prompts': True}", "classify the new key"),
    ("debug logging", {}, dict(log_level="debug"),
     ["no privileged runtime access (P)"], "log_level='debug'", "--log-level info"),
    ("plaintext HTTP beyond loopback", {}, dict(host="0.0.0.0"),
     ["enforceable guarantees (E)"], "host='0.0.0.0'", "--host 127.0.0.1"),
    ("prefix caching", dict(enable_prefix_caching=True), None,
     ["stateless computation (S)", "enforceable guarantees (E)"], "enable_prefix_caching=True",
     "--public-prefix-file"),
]
IDS = [case[0] for case in UNSAFE_SETTINGS]


def settings(policy: str, engine: dict, server: dict | None) -> tuple[EngineConfig, ServerOptions | None]:
    return EngineConfig(model=MODEL, privacy=policy, **engine), None if server is None else ServerOptions(**server)


def verdicts(config: EngineConfig, server: ServerOptions | None) -> dict[str, str]:
    return {f.feature.name: f.verdict for f in check(config, server)}


@pytest.mark.parametrize("feature, engine, server, rules, setting, alternative", UNSAFE_SETTINGS, ids=IDS)
def test_pcc_refuses_with_rule_setting_and_alternative(feature, engine, server, rules, setting, alternative):
    config, options = settings("pcc", engine, server)
    with pytest.raises(PolicyViolation) as exc:
        enforce(config, options)
    message = str(exc.value)
    assert f"The pcc privacy policy refuses {feature} ({setting})" in message
    assert all(rule in message for rule in rules)
    assert alternative in message.split("Safe alternative: ")[1] and "--privacy open" in message
    assert [f.feature.name for f in exc.value.findings] == [feature]
    assert isinstance(exc.value, ValueError)  # the CLI answers ValueErrors with a sentence and exit status 2


@pytest.mark.parametrize("feature, engine, server, rules, setting, alternative", UNSAFE_SETTINGS, ids=IDS)
def test_open_allows_but_reports_the_threat(feature, engine, server, rules, setting, alternative):
    config, options = settings("open", engine, server)
    enforce(config, options)
    assert verdicts(config, options)[feature] == UNSAFE
    result = report(config, options)
    assert result["ok"]
    (message,) = [m for m in result["messages"] if feature in m]
    assert f"The open privacy policy allows {feature} ({setting})" in message and "pcc would refuse it" in message


def test_pcc_accepts_the_defaults():
    config, options = settings("pcc", {}, {})
    enforce(config, options)
    found = verdicts(config, options)
    assert found["paged KV cache"] == found["continuous batching scheduler"] == ALLOWED
    assert found["OpenAI HTTP API with /metrics"] == ALLOWED
    assert {found[name] for name in ("dummy weights", "debug logging", "plaintext HTTP beyond loopback")} == {OFF}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_listeners_are_allowed(host):
    enforce(*settings("pcc", {}, dict(host=host)))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "node.example"])
def test_other_listeners_are_refused(host):
    with pytest.raises(PolicyViolation, match="plaintext HTTP beyond loopback"):
        enforce(*settings("pcc", {}, dict(host=host)))


def test_known_extra_key_is_allowed_and_no_server_means_no_listener():
    config, _ = settings("pcc", dict(extra={"served_model_name": "m"}), None)
    enforce(config)
    assert verdicts(config, None)["OpenAI HTTP API with /metrics"] == OFF


def test_every_refusal_is_reported_at_once():
    config, options = settings("pcc", dict(load_format="dummy"), dict(host="0.0.0.0", log_level="debug"))
    with pytest.raises(PolicyViolation) as exc:
        enforce(config, options)
    assert len(str(exc.value).splitlines()) == 3
    assert {f.verdict for f in exc.value.findings} == {REFUSED}


def test_unknown_policy_names_the_field():
    with pytest.raises(ValueError, match="privacy must be 'pcc' .* or 'open', got 'strict'"):
        EngineConfig(model=MODEL, privacy="strict")


def test_attestation_is_encouraged_and_makes_a_wider_listener_safe_under_pcc():
    """Without --attest the node is allowed (README's `ccserve serve`) but reported; with it under pcc, plaintext
    is refused by the node itself, so a non-loopback listener carries only sealed requests."""
    plain = verdicts(*settings("pcc", {}, {}))
    assert plain["serving without attestation"] == ALLOWED
    attested = verdicts(*settings("pcc", {}, dict(attest=True, host="0.0.0.0")))
    assert attested["serving without attestation"] == OFF and attested["plaintext HTTP beyond loopback"] == OFF
    enforce(*settings("pcc", {}, dict(attest=True, host="0.0.0.0")))
    # under open, an attested node still takes plaintext requests: a wide listener is then a threat again
    open_wide = verdicts(*settings("open", {}, dict(attest=True, host="0.0.0.0")))
    assert open_wide["plaintext HTTP beyond loopback"] == UNSAFE
    routed = verdicts(*settings("pcc", {}, dict(attest=True, router="http://router:8082", capacity=8)))
    assert routed["machine-level scheduler"] == ALLOWED and plain["machine-level scheduler"] == OFF


@pytest.mark.parametrize("server, message", [
    (dict(router="http://router:8082"), "router needs attest"),
    (dict(attest=True, capacity=4), "give router too"),
    (dict(attest=True, router="router:8082"), "must be an http"),
    (dict(attest=True, router="http://r", capacity=0), "capacity must be >= 1"),
])
def test_router_options_are_checked(server, message):
    with pytest.raises(ValueError, match=message):
        ServerOptions(**server)
