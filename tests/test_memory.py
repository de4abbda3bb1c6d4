"""The engine's cache attends as SDPA over each sequence's own keys, whichever way it stores and
reads them: the compiled CPU kernel over blocked keys, or per-row SDPA (GPUs, no compiler)."""

import pytest
import torch
import torch.nn.functional as F

from retro_ray.serving import kernels
from retro_ray.serving.memory import KVCache, PassLayout, Segment


def _pass(offsets: list[int], starts: list[int], lengths: list[int]) -> PassLayout:
    segments, first = [], 0
    for offset, start, length in zip(offsets, starts, lengths):
        segments.append(Segment(first, length, offset, start))
        first += length
    return PassLayout(segments, torch.device("cpu"))


def _filled(kernel, layout: PassLayout, h_kv: int, e: int, tokens: int, seed: int) -> KVCache:
    """A cache whose every segment's keys up to its last position are written by layer 0's passes."""
    cache = KVCache(tokens, torch.device("cpu"))
    cache.kernel = kernel
    history = _pass([s.offset for s in layout.segments], [0] * len(layout.segments),
                    [s.seen for s in layout.segments])
    g = torch.Generator().manual_seed(seed)
    T = sum(s.seen for s in layout.segments)
    cache.write(0, torch.randn(1, h_kv, T, e, generator=g), torch.randn(1, h_kv, T, e, generator=g), history)
    return cache


@pytest.mark.parametrize("g, e, window", [(3, 64, None), (1, 32, None), (8, 128, None), (2, 64, 5), (12, 64, None)])
def test_the_decode_kernel_attends_as_sdpa_over_each_rows_own_keys(g, e, window):
    """Decode rows at unaligned offsets and lengths (a block's first and last lanes, a row of one
    key), next to a prompt slice, with and without a sliding window, and more query heads per key
    head than one call takes (multi-query models: in groups): the kernel's output equals per-row
    SDPA's (fp32, 1e-5), and the prompt slice's is untouched by it."""
    kernel = kernels.decode_attention()
    if kernel is None:
        pytest.skip("no compiler for the CPU kernel on this machine")
    h_kv, tokens = 2, 300
    offsets, starts, lengths = [3, 40, 100, 150, 220], [0, 15, 37, 20, 9], [1, 1, 1, 1, 6]
    layout = _pass(offsets, starts, lengths)
    q = torch.randn(1, g * h_kv, sum(lengths), e, generator=torch.Generator().manual_seed(1))
    blocked, plain = (_filled(k, layout, h_kv, e, tokens, seed=0) for k in (kernel, None))
    assert blocked.k[0].dim() == 4 and plain.k[0].dim() == 3
    ours, theirs = (c.attend(0, q, layout, window=window) for c in (blocked, plain))  # [1, T, h, e]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    s = layout.segments[1]  # a row's output by hand: its query heads over its own keys only
    lo = s.offset + (0 if window is None else max(0, s.start - window + 1))
    keys, values = plain.k[0][:, lo:s.offset + s.seen], plain.v[0][:, lo:s.offset + s.seen]  # [h_kv, n, e]
    qs = q[0, :, s.first].view(h_kv, g, e)
    torch.testing.assert_close(ours[0, s.first].view(h_kv, g, e),
                               F.scaled_dot_product_attention(qs, keys, values), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blocked", [True, False])
def test_a_fork_copies_its_parents_keys_and_values_in_either_layout(blocked):
    """``copy`` (a fork's prompt) moves unaligned ranges of keys and values, blocked keys included."""
    kernel = kernels.decode_attention() if blocked else None
    if blocked and kernel is None:
        pytest.skip("no compiler for the CPU kernel on this machine")
    cache = _filled(kernel, _pass([5], [0], [40]), 2, 64, 200, seed=2)
    assert (cache.k[0].dim() == 4) == blocked
    cache.copy(5, 101, 40)
    torch.testing.assert_close(cache.keys(0, 101, 141), cache.keys(0, 5, 45), atol=0, rtol=0)
    torch.testing.assert_close(cache.v[0][:, 101:141], cache.v[0][:, 5:45], atol=0, rtol=0)
