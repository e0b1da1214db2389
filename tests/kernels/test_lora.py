"""The batched LoRA kernels under the Triton interpreter against the PyTorch reference and a per-token loop."""
import pytest
import torch

from ccserve.kernels.lora import lora_expand_ref, lora_expand_triton, lora_shrink_ref, lora_shrink_triton

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _by_token(x, a, b, slots, y, offset):
    """The definition, one token at a time."""
    out = y.clone().float()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[t, offset:offset + b.shape[1]] += (x[t].float() @ a[s].float().t()) @ b[s].float().t()
    return out.to(y.dtype)


@pytest.mark.parametrize("tokens,num_in,num_out,rank,dtype", [
    (7, 96, 80, 8, torch.float32),      # sizes off the block sizes
    (5, 64, 130, 16, torch.bfloat16),
    (1, 200, 48, 3, torch.float32),     # a rank that is not a power of two
])
def test_shrink_expand_match_reference(tokens, num_in, num_out, rank, dtype):
    torch.manual_seed(0)
    slots_n, offset, total = 3, 16, num_out + 40
    x = torch.randn(tokens, num_in).to(dtype)
    a = (0.1 * torch.randn(slots_n, rank, num_in)).to(dtype)
    b = (0.1 * torch.randn(slots_n, num_out, rank)).to(dtype)
    slots = torch.tensor([(i % (slots_n + 1)) - 1 for i in range(tokens)], dtype=torch.int32)  # -1, 0, 1, 2, ...
    y = torch.randn(tokens, total).to(dtype)

    h_ref, h_tri = lora_shrink_ref(x, a, slots), lora_shrink_triton(x, a, slots)
    torch.testing.assert_close(h_tri, h_ref, **TOL[torch.float32])
    y_ref, y_tri = y.clone(), y.clone()
    lora_expand_ref(h_ref, b, slots, y_ref, offset)
    lora_expand_triton(h_ref, b, slots, y_tri, offset)
    torch.testing.assert_close(y_tri, y_ref, **TOL[dtype])
    torch.testing.assert_close(y_ref, _by_token(x, a, b, slots, y, offset), **TOL[dtype])
    none = slots < 0
    assert torch.equal(y_tri[none], y[none])                                  # slot -1: untouched
    assert torch.equal(y_tri[:, :offset], y[:, :offset])                      # other columns untouched
