"""The engine over a sealed tensor-parallel group (--cc with --tensor-parallel-size 2, docs/tp.md phase 3): rank 0
here and rank 1 in a worker, every collective between them AES-GCM sealed: the same greedy output as one
process, and a tampered collective fails the step, the requests and the group (no process left)."""
from __future__ import annotations

import multiprocessing

import pytest

from ccserve import LLM, SamplingParams
from ccserve.distributed.sealed import SealedTensorParallelGroup
from ccserve.engine.tp_workers import WorkerExited
from ccserve.secure import IntegrityError
from tests.tiny_models import make_tiny_model_dir

PROMPTS = [[5, 9, 33, 12, 7], [40, 41, 42], list(range(10, 40))]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SETTINGS = dict(device="cpu", block_size=8, max_model_len=64, max_num_batched_tokens=16, num_decode_steps=4)


def generate(llm: LLM) -> list[list[int]]:
    try:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.close()


def test_sealed_tp2_generates_what_one_process_generates_and_fails_when_tampered(tmp_path):
    path = str(make_tiny_model_dir(tmp_path, "llama"))
    want = generate(LLM(path, **SETTINGS))
    llm = LLM(path, tensor_parallel_size=2, cc="naive", **SETTINGS)
    engine = llm.engine
    try:
        assert isinstance(engine.runner.tp, SealedTensorParallelGroup)
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == want
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        engine.step()
        tamper_next_gather(engine.runner.tp)
        with pytest.raises(WorkerExited, match=r"rank 0 failed \(IntegrityError\)") as failed:
            for _ in range(20):
                engine.step()
        assert isinstance(failed.value.__cause__, IntegrityError)
        assert engine.requests == {} and not engine.has_unfinished_requests()
    finally:
        llm.close()
    assert multiprocessing.active_children() == []


def tamper_next_gather(tp: SealedTensorParallelGroup) -> None:
    """Flip one ciphertext byte of what rank 1 sends rank 0 in the next logits all-gather. It is the step's last
    collective, so rank 1 is not left waiting inside one when rank 0 fails."""
    transfer, gather, armed = tp._transfer, tp.all_gather, []

    def flipping_transfer(send, width):
        recv = transfer(send, width)
        if armed:
            recv[5] ^= 1
            armed.clear()
        return recv

    def arming_gather(x):
        armed.append(True)
        return gather(x)

    tp._transfer, tp.all_gather = flipping_transfer, arming_gather

