"""The privacy policies: `pcc` (the default) refuses every setting the registry marks unsafe; `open` runs it,
and `ccserve audit` still reports the threat.

Why refuse at start: a guarantee that holds only when the operator remembers a flag is not enforceable, and
checking before anything is loaded means an unsafe node never serves a single request.
"""
from __future__ import annotations

from dataclasses import dataclass

from ccserve.config import EngineConfig, ServerOptions
from ccserve.privacy.registry import FEATURES, RULES, Feature, Settings

ABSENT, OFF, ALLOWED, UNSAFE, REFUSED = "absent", "off", "allowed", "unsafe", "refused"


class PolicyViolation(ValueError):
    """Settings the pcc policy refuses; the message has one sentence per refused feature."""

    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("\n".join(f.sentence() for f in findings))
        self.findings = findings


@dataclass(frozen=True)
class Finding:
    """The verdict on one feature under one policy, with the values of the settings that decide it."""

    feature: Feature
    policy: str
    verdict: str
    values: dict[str, object]

    @property
    def refused(self) -> bool:
        return self.verdict == REFUSED

    def sentence(self) -> str:
        """What an operator must read about an unsafe feature: the rule, the setting, the safe alternative."""
        f = self.feature
        setting = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        rules = " and ".join(f"{RULES[r]} ({r})" for r in f.threatens)
        if self.refused:
            return (f"The pcc privacy policy refuses {f.name} ({setting}): it threatens {rules}, because "
                    f"{f.threat}. Safe alternative: {f.alternative}; or --privacy open, which gives up that guarantee.")
        return (f"The {self.policy} privacy policy allows {f.name} ({setting}), which threatens {rules}, because "
                f"{f.threat}; pcc would refuse it. Safe alternative: {f.alternative}.")


def check(config: EngineConfig, server: ServerOptions | None = None) -> list[Finding]:
    """The verdict on every registered feature, under the policy that `config.privacy` names."""
    settings = Settings(config, server)
    return [_judge(f, settings) for f in FEATURES]


def enforce(config: EngineConfig, server: ServerOptions | None = None) -> None:
    """Raise PolicyViolation when the policy refuses any setting; call before loading anything."""
    refused = [f for f in check(config, server) if f.refused]
    if refused:
        raise PolicyViolation(refused)


def _judge(feature: Feature, settings: Settings) -> Finding:
    policy = settings.config.privacy
    values = {name: settings.get(name) for name in feature.fields}
    if not feature.present:
        verdict = ABSENT
    elif not feature.enabled(settings):
        verdict = OFF
    elif feature.pcc:
        verdict = ALLOWED
    else:
        verdict = REFUSED if policy == "pcc" else UNSAFE
    return Finding(feature, policy, verdict, values)
