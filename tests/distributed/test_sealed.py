"""Sealed collectives on gloo with real processes: they compute what the plain ones compute, and a message that an
attacker on the link flips or replays fails authentication on the rank that receives it: what it carried is never
used (zeros instead), the rank's verify() raises, and the failure reaches the other rank with the next collective."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ccserve.distributed.group import destroy_tensor_parallel, init_tensor_parallel
from ccserve.distributed.launch import spawn
from ccserve.distributed.sealed import SealedTensorParallelGroup
from ccserve.secure import ChannelClosed, IntegrityError

CHUNK = 256     # small chunks: every message below spans several GCM messages, with a short last one


class OnPath(SealedTensorParallelGroup):
    """A sealed group whose incoming wire an attacker controls on rank 1: "flip" flips a ciphertext byte of the
    second message, "replay" delivers the first message again in place of the second."""

    def __init__(self, *args, attack: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attack, self.seen = attack, []

    def _transfer(self, send: torch.Tensor, width: int) -> torch.Tensor:
        recv = super()._transfer(send, width)
        self.seen.append(recv.clone())
        if self.rank == 1 and len(self.seen) == 2:
            if self.attack == "flip":
                recv[CHUNK + 16 + 3] ^= 1       # inside the second chunk's ciphertext
            elif self.attack == "replay":
                recv.copy_(self.seen[0])
        return recv


def _results(tp, sealed) -> dict:
    """Sealed and plain all-reduce and all-gather of the same random contributions, in fp32 and bf16."""
    torch.manual_seed(tp.rank)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 41, dtype=dtype)     # 492 / 246 bytes: not a multiple of 16, padded for the kernels
        results[dtype] = [(sealed.all_reduce(x.clone()), tp.all_reduce(x.clone())),
                          (sealed.all_gather(x), tp.all_gather(x))]
    return results


def _verdict(sealed, check=None) -> str:
    try:
        sealed.verify(check)
        return "ok"
    except IntegrityError as exc:
        return str(exc)


def _attacked(sealed) -> dict:
    """Three all-reduces of 1600 bytes (chunks of 256: element 64 is in the second chunk): the first and 64th
    element of each sum, and the verdicts: rank 0's after the second and the third; rank 1's as of a checkpoint
    taken after the first, then after the third (a failed verify closes the group)."""
    x = torch.full((4, 100), float(sealed.rank + 1))
    sums, verdicts, early = [], [], None
    for i in range(3):
        got = sealed.all_reduce(x.clone())
        sums.append((float(got[0, 0]), float(got[0, 64])))
        if i == 0:
            early = sealed.checkpoint()
        if i == 2 or (i == 1 and sealed.rank == 0):
            if i == 2 and sealed.rank == 1:
                verdicts.append(_verdict(sealed, early))    # the flag as it was before the attack
            verdicts.append(_verdict(sealed))
    return dict(sums=sums, verdicts=verdicts)


def _worker(rank: int, size: int, init_method: str, out_dir: str) -> None:
    tp = init_tensor_parallel(rank, size, init_method, torch.device("cpu"))
    sealed = SealedTensorParallelGroup(tp, torch.device("cpu"), chunk_bytes=CHUNK)
    out = {"results": _results(tp, sealed)}
    sealed.close()
    with pytest.raises(ChannelClosed):
        sealed.all_reduce(torch.ones(4))
    if size == 2:
        for attack in ("flip", "replay"):       # a fresh sealed group (new keys) each
            sealed = OnPath(tp, torch.device("cpu"), chunk_bytes=CHUNK, attack=attack)
            out[attack] = _attacked(sealed)
            sealed.close()
    destroy_tensor_parallel(tp)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def check_equal(ranks: list[dict], exact: bool) -> None:
    """Sealed equals plain (bit for bit when exact), and every rank's sealed sum is bit-identical."""
    tolerance = dict(atol=0, rtol=0) if exact else dict(atol=1e-2, rtol=2e-2)
    for out in ranks:
        for dtype, pairs in out["results"].items():
            for got, want in pairs:
                assert got.dtype == dtype
                torch.testing.assert_close(got, want, **tolerance)
    for dtype in ranks[0]["results"]:       # every rank adds the same contributions in rank order
        assert all(torch.equal(r["results"][dtype][0][0], ranks[0]["results"][dtype][0][0]) for r in ranks)


def test_three_ranks_equal_the_plain_collectives(tmp_path):
    spawn(_worker, 3, str(tmp_path))
    check_equal([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(3)], exact=False)  # bf16: other order


def test_two_ranks_equal_gloo_bit_for_bit_and_reject_a_flipped_or_replayed_message(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    check_equal(ranks, exact=True)          # two addends: gloo adds them as we do
    for attack in ("flip", "replay"):
        rank0, rank1 = ranks[0][attack], ranks[1][attack]
        assert rank0["sums"] == [(3.0, 3.0)] * 3          # rank 0's incoming link was untouched
        assert rank1["sums"][0] == (3.0, 3.0)
        # flip: the second chunk failed, so rank 1 added zeros for it, never the altered plaintext; replay: every
        # chunk failed (the receiver's counters moved on). Rank 0's message of the third sum was whole.
        assert rank1["sums"][1] == ((3.0 if attack == "flip" else 2.0), 2.0)
        assert rank1["sums"][2] == (3.0, 3.0)
        assert rank1["verdicts"][0] == "ok" and "failed authentication" in rank1["verdicts"][1]
        # Rank 0 learns of it from rank 1's next message: clean after the second sum, failed after the third.
        assert rank0["verdicts"][0] == "ok" and "failed authentication" in rank0["verdicts"][1]
