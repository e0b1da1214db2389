"""Hardware roots of trust: a quote from the CPU TEE (Intel TDX, AMD SEV-SNP, through the kernel's configfs-tsm)
and NVIDIA GPU attestation evidence (through nv-attestation-sdk when the GPU is in confidential-computing mode).

Each root binds the evidence payload (nonce, keys, measurement) into hardware-signed data: the TEE's 64-byte
REPORTDATA is SHA-512(label || payload), the GPU's 32-byte nonce is SHA-256(label || payload). A verifier that
recomputes them from the payload it received knows the hardware report was made for that payload and no other.

What this module does not do: verify the hardware's signature chain (Intel PCS / AMD KDS / NVIDIA RIM and OCSP
services, all remote). A client that requires hardware plugs a verifier per kind into `verify_hardware`; without
one, hardware evidence counts for nothing, and the client says so rather than pretend.

Status: the configfs-tsm path follows the kernel ABI (Documentation/ABI/testing/configfs-tsm) and the NVIDIA path
the SDK's documented calls; neither machine type exists where the tests run, so both are exercised there only
through their parsing and binding checks.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ccserve.attest.encoding import b64decode, b64encode
from ccserve.attest.errors import HardwareRequired, MalformedEvidence

log = logging.getLogger(__name__)

LABEL = b"ccserve-evidence/v1 hardware-binding\n"
TSM_REPORT = Path("/sys/kernel/config/tsm/report")
_TSM_KINDS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}
# Where REPORTDATA sits: TDX quote v4 = 48-byte header + 520 bytes into the TD quote body; v5 adds a 6-byte body
# descriptor. SEV-SNP attestation report: offset 0x50.
_TDX_REPORT_DATA = {4: 48 + 520, 5: 48 + 6 + 520}
_SNP_REPORT_DATA = 0x50

HardwareVerifier = Callable[[dict, bytes], None]
"""A check of one hardware evidence item's signature chain: (item, expected binding bytes) -> None, raising
HardwareRequired when the chain does not verify."""


def report_data(payload: bytes) -> bytes:
    return hashlib.sha512(LABEL + payload).digest()


def gpu_nonce(payload: bytes) -> bytes:
    return hashlib.sha256(LABEL + payload).digest()


@dataclass
class ConfigfsTsm:
    """A TDX or SEV-SNP quote through /sys/kernel/config/tsm/report (Linux >= 6.7 in a TEE guest)."""

    root: Path = TSM_REPORT
    kind: str = "cpu-tee"  # "tdx" or "sev-snp" once a report was collected

    def available(self) -> bool:
        return self.root.is_dir()

    def collect(self, payload: bytes) -> dict:
        entry = self.root / f"ccserve-{secrets.token_hex(8)}"
        entry.mkdir()
        try:
            (entry / "inblob").write_bytes(report_data(payload))
            blob = (entry / "outblob").read_bytes()
            provider = (entry / "provider").read_text().strip()
        finally:
            entry.rmdir()
        kind = _TSM_KINDS.get(provider)
        if kind is None:
            raise RuntimeError(f"configfs-tsm provider {provider!r} is not one ccserve knows (tdx_guest, sev_guest)")
        self.kind = kind
        item = {"kind": kind, "provider": provider, "report": b64encode(blob)}
        if quote_report_data(item) != report_data(payload):
            raise RuntimeError("the TEE quote does not carry the REPORTDATA written to configfs-tsm")
        return item


@dataclass
class NvidiaGpu:
    """GPU attestation evidence from nv-attestation-sdk (the raw evidence a verifier sends to NVIDIA's service)."""

    kind: str = "nvidia-gpu"

    def available(self) -> bool:
        try:
            import nv_attestation_sdk  # noqa: F401
        except ImportError:
            return False
        return True

    def collect(self, payload: bytes) -> dict:
        from nv_attestation_sdk import attestation
        client = attestation.Attestation()
        client.set_name("ccserve-node")
        client.set_nonce(gpu_nonce(payload).hex())
        client.add_verifier(attestation.Devices.GPU, attestation.Environment.LOCAL, "", "")
        evidence = client.get_evidence()
        if not evidence:
            raise RuntimeError("nv-attestation-sdk returned no GPU evidence: is the GPU in CC mode?")
        return {"kind": "nvidia-gpu", "nonce": gpu_nonce(payload).hex(), "evidence": evidence}


def detect_roots(tsm_root: Path = TSM_REPORT) -> list[ConfigfsTsm | NvidiaGpu]:
    """The hardware roots this machine has, each proven by collecting one report at start (a GPU not in CC mode
    or a TEE without a quote provider fails here, once, with the reason logged); the probe also fixes each root's
    kind, which evidence payloads name before their reports are made."""
    roots: list[ConfigfsTsm | NvidiaGpu] = []
    for root in (ConfigfsTsm(tsm_root), NvidiaGpu()):
        if not root.available():
            continue
        try:
            root.collect(b"ccserve start-up probe")
        except Exception as exc:  # a root that cannot report is absent, not fatal
            log.warning("hardware root %s is present but cannot report (%s); not used", type(root).__name__, exc)
            continue
        roots.append(root)
    return roots


def quote_report_data(item: dict) -> bytes:
    """The REPORTDATA inside a TDX quote or SEV-SNP report item; MalformedEvidence when it has none."""
    try:
        blob = b64decode(item["report"], "the hardware report")
    except (KeyError, TypeError, ValueError):
        raise MalformedEvidence("the hardware evidence item has no base64 'report'") from None
    if item.get("kind") == "tdx":
        offset = _TDX_REPORT_DATA.get(int.from_bytes(blob[:2], "little"))
    elif item.get("kind") == "sev-snp":
        offset = _SNP_REPORT_DATA
    else:
        offset = None
    if offset is None or len(blob) < offset + 64:
        raise MalformedEvidence(f"the {item.get('kind')!r} hardware report is too short or of an unknown version")
    return blob[offset:offset + 64]


def verify_hardware(items: list, payload: bytes, verifiers: dict[str, HardwareVerifier]) -> list[str]:
    """The kinds of hardware evidence in `items` that are bound to `payload` and whose chains a configured
    verifier accepted. A binding mismatch is an error (the report was made for other evidence); an item of a kind
    with no verifier is skipped (it proves nothing here)."""
    verified = []
    for item in items:
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind in ("tdx", "sev-snp"):
            expected = report_data(payload)
            if quote_report_data(item) != expected:
                raise HardwareRequired(f"the {kind} report's REPORTDATA does not bind this evidence: it was made for "
                                       "other keys or another nonce")
        elif kind == "nvidia-gpu":
            expected = gpu_nonce(payload)
            if item.get("nonce") != expected.hex():
                raise HardwareRequired("the GPU evidence's nonce does not bind this evidence")
        else:
            raise MalformedEvidence(f"unknown hardware evidence kind {kind!r}")
        if kind in verifiers:
            verifiers[kind](item, expected)
            verified.append(kind)
    return verified
