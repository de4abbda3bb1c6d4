"""Retro model properties on a tiny CPU config, after TobiasNorlund/retro's tests."""

import pytest
import torch

from retro_ray.model import Retro, RetroConfig

M, K, R = 4, 2, 8  # chunk length, neighbours, neighbour length


def tiny(retrieval=True, **kw) -> Retro:
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, chunk_length=M, k=K,
                      encoder_layers=1, cca_layers=[2, 4], retrieval=retrieval, **kw)
    model = Retro(cfg).eval()
    with torch.no_grad():  # trained-looking CCA: the zero init would make every test pass trivially
        for block in model.blocks:
            if block.cca is not None:
                torch.nn.init.normal_(block.cca.attn.out.weight, std=0.2)
    return model


def inputs(b=2, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 61, (b, n), generator=g)
    neighbors = torch.randint(0, 61, (b, n // M, K, R), generator=g)
    return tokens, neighbors, torch.ones_like(neighbors, dtype=torch.bool)


def logits(model, *args):
    with torch.no_grad():
        return model(*args)[0]


def test_default_cca_layers_follow_megatron():
    assert RetroConfig(n_layers=12).resolved_cca_layers() == [6, 9, 12]
    assert RetroConfig(n_layers=24).resolved_cca_layers() == [9, 12, 15, 18, 21, 24]
    assert RetroConfig(n_layers=12, retrieval=False).resolved_cca_layers() == []
    assert RetroConfig().neighbor_len == 128
    with pytest.raises(ValueError, match="cca_layers"):
        RetroConfig(n_layers=4)


def test_encoder_width_keeps_the_head_width():
    assert RetroConfig(d_model=256, n_heads=8, encoder_d_model=64).encoder_heads == 2
    assert RetroConfig(d_model=256, n_heads=8).encoder_width == 256
    with pytest.raises(ValueError, match="encoder_d_model=48 is not a multiple of the head width 32"):
        RetroConfig(d_model=256, n_heads=8, encoder_d_model=48)


@pytest.mark.parametrize("encoder_d_model", [None, 16])
@pytest.mark.parametrize("u", [0, 1, 2])
def test_later_tokens_and_neighbours_never_reach_earlier_positions(u, encoder_d_model):
    model = tiny(encoder_d_model=encoder_d_model)
    tokens, neighbors, mask = inputs()
    base = logits(model, tokens, neighbors, mask)
    changed = tokens.clone()
    changed[:, (u + 1) * M:] = (changed[:, (u + 1) * M:] + 1) % 61
    assert torch.allclose(logits(model, changed, neighbors, mask)[:, : (u + 1) * M], base[:, : (u + 1) * M], atol=1e-6)
    other = neighbors.clone()
    other[:, u + 1] = (other[:, u + 1] + 7) % 61
    out = logits(model, tokens, other, mask)
    first_seen = (u + 1) * M + M - 1  # the last token of chunk u + 1
    assert torch.allclose(out[:, :first_seen], base[:, :first_seen], atol=1e-6)
    assert not torch.allclose(out[:, first_seen], base[:, first_seen], atol=1e-4)  # and it is used


def test_gradients_flow_only_backwards_in_time():
    model = tiny()
    tokens, neighbors, mask = inputs(b=1)
    emb = model.wte(tokens).detach().requires_grad_(True)
    x = emb + model.wpe.weight[: tokens.shape[1]]
    retrieved = model._retriever(neighbors, mask, tokens.shape[1])
    for block in model.blocks:
        x = block(x, retrieved)
    x[0, 9].sum().backward()  # position 9 is in chunk 2
    grad = emb.grad[0].abs().sum(-1)
    assert (grad[10:] == 0).all() and (grad[:10] > 0).all()


def test_masked_and_absent_neighbours_change_nothing():
    model = tiny()
    tokens, neighbors, mask = inputs()
    mask[:, 1, 0, 5:] = False  # padding inside a neighbour
    mask[:, 2] = False  # chunk 2 has no neighbours at all (-1 slots)
    base = logits(model, tokens, neighbors, mask)
    other = neighbors.clone()
    other[:, 1, 0, 5:] = 0
    other[:, 2] = 3
    out = logits(model, tokens, other, mask)
    assert torch.allclose(out, base, atol=1e-6) and torch.isfinite(out).all()
    none = logits(model, tokens, neighbors, torch.zeros_like(mask))  # every chunk without neighbours
    assert torch.isfinite(none).all()


def test_batch_independence():
    model = tiny()
    tokens, neighbors, mask = inputs()
    base = logits(model, tokens, neighbors, mask)
    tokens2, neighbors2 = tokens.clone(), neighbors.clone()
    tokens2[1] = (tokens2[1] + 5) % 61
    neighbors2[1] = (neighbors2[1] + 5) % 61
    out = logits(model, tokens2, neighbors2, mask)
    assert torch.allclose(out[0], base[0], atol=1e-6) and not torch.allclose(out[1], base[1], atol=1e-4)


@pytest.mark.parametrize("prefix", [3, 4, 9, 15])
def test_prefix_equals_full_sequence(prefix):
    model = tiny()
    tokens, neighbors, mask = inputs()
    full = logits(model, tokens, neighbors, mask)
    part = logits(model, tokens[:, :prefix], neighbors, mask)  # only complete chunks' neighbours used
    assert torch.allclose(part, full[:, :prefix], atol=1e-5)


def test_gpt_baseline_is_the_same_code_without_retrieval():
    gpt, retro = tiny(retrieval=False), tiny()
    assert gpt.encoder is None and all(b.cca is None for b in gpt.blocks)
    assert gpt.num_params() < retro.num_params()
    tokens, neighbors, mask = inputs()
    retro_no_neighbours = logits(retro, tokens)
    gpt.load_state_dict({k: v for k, v in retro.state_dict().items() if k in gpt.state_dict()})
    assert torch.allclose(logits(gpt, tokens), retro_no_neighbours, atol=1e-6)


def test_fresh_cca_changes_nothing_and_training_lowers_the_loss():
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, chunk_length=M, k=K,
                      encoder_layers=1, cca_layers=[2, 4])
    model = Retro(cfg)
    tokens, neighbors, mask = inputs()
    assert torch.allclose(logits(model.eval(), tokens, neighbors, mask), logits(model, tokens), atol=1e-6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(tokens[:, :-1], neighbors, mask, targets=tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_all_masked_neighbours_equal_no_neighbours_with_a_trained_cca_bias():
    """Once CCA's output bias is trained, "every neighbour masked" must still mean "none"."""
    model = tiny()
    with torch.no_grad():
        for block in model.blocks:
            if block.cca is not None:
                torch.nn.init.normal_(block.cca.attn.out.bias, std=0.5)
    tokens, neighbors, mask = inputs()
    assert torch.equal(logits(model, tokens, neighbors, torch.zeros_like(mask)), logits(model, tokens))


def test_neighbour_token_minus_one_is_masked_padding():
    model = tiny()
    tokens, neighbors, mask = inputs()
    padded = neighbors.clone()
    padded[:, 0, 1, 3:] = -1  # the rest of a neighbour is padding
    padded[:, 2] = -1  # chunk 2 has no neighbours
    expected_mask = mask.clone()
    expected_mask[:, 0, 1, 3:] = False
    expected_mask[:, 2] = False
    expected = logits(model, tokens, neighbors, expected_mask)
    assert torch.equal(logits(model, tokens, padded, mask), expected)
    assert torch.equal(logits(model, tokens, padded), expected)  # no mask given: -1 alone masks


@pytest.mark.parametrize("vocabulary_first", [True, False])
@pytest.mark.parametrize("b,positions", [(1, [5]), (1, [0, 3, 9]), (2, [1, 2])])
def test_logits_at_sampled_positions_equal_the_full_logits_there(monkeypatch, vocabulary_first, b, positions):
    """Whichever of the head's two products ``sampled_logits`` measured faster, the logits at the
    sampled positions are the full pass's there (one position too, which is doubled)."""
    from retro_ray.model import retro

    model = tiny()
    head = model.lm_head.weight
    monkeypatch.setitem(retro._VOCABULARY_FIRST, (tuple(head.shape), head.dtype), vocabulary_first)
    tokens, neighbors, mask = inputs(b=b)
    n = tokens.shape[1]
    with torch.no_grad():
        full = model(tokens, neighbors, mask)[0]  # [b, n, V]
        retrieved = model._retriever(neighbors, mask, n)
        at = torch.tensor(positions)
        sampled = model.decode(tokens, torch.arange(n), retrieved, logits_at=at)  # [b, P, V]
    assert sampled.shape == (b, len(positions), 61)
    torch.testing.assert_close(sampled, full[:, at], rtol=1e-5, atol=1e-5)
    assert torch.equal(sampled.argmax(-1), full[:, at].argmax(-1))
