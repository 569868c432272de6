"""Sentence VAE: adapter sites, pooling and KV-prefix injection against hand computations; encoder and decoder
behaviour; objectives, schedules and floors; metrics on small cases with hand-computed values."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from hub.adapters.vae import (SentenceVAE, VAEConfig, encode_sentences, ffn_parallel_adapter, interpolation_path,
                              pad_rows)
from hub.adapters.vlm import vlm_adapter
from hub.errors import HubError
from hub.evaluation.vae_metrics import (active_units, decoder_use_of_z, iw_terms, kl_per_dim, log_normal,
                                        log_standard_normal, mutual_information, own_vocabulary)
from hub.model.backbone import load_backbone
from hub.training.vae_objectives import beta_at, delete_tokens, drop_words, elbo_loss, kl_regulariser


@pytest.fixture(scope="module")
def backbone(tiny_base):
    return load_backbone(str(tiny_base), "cpu")


def make_vae(backbone, seed: int = 0, **options) -> SentenceVAE:
    """A VAE whose every weight is random (W_up too), so every part does visible work."""
    torch.manual_seed(seed)
    config = VAEConfig(**{"nz": 4, "encoder_layers": 1, "bottleneck": 3, **options})
    vae = SentenceVAE(config, backbone.model.config)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return vae.eval()


def batch(backbone, sentences=("a man walks a dog .", "two people sit on a bench")):
    return pad_rows(encode_sentences(backbone.tokenizer, list(sentences), 16), backbone.device)


def block_io(model, block_index: int, run):
    """(input, output) hidden states of one block during `run()`."""
    seen = {}
    handle = model.transformer.h[block_index].register_forward_hook(
        lambda m, args, output: seen.update(x=args[0], y=output[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def test_block_output_site_is_the_vlm_formula(backbone):
    """Block 0's raw output (a hook registered before the adapter's sees it) and what block 1 receives."""
    model, vae = backbone.model, make_vae(backbone)
    ids, mask = batch(backbone)
    seen = {}
    hooks = [model.transformer.h[0].register_forward_hook(lambda m, args, out: seen.update(raw=out[0])),
             model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.update(adapted=args[0]))]
    try:
        vae.decoder_logits(model, ids, mask, torch.randn(2, 4))
    finally:
        for h in hooks:
            h.remove()
    w = vae.decoder_adapters.weights().map(lambda t: t[0])
    x = F.layer_norm(seen["raw"], seen["raw"].shape[-1:], eps=model.config.layer_norm_epsilon) * w.ln_weight + w.ln_bias
    hand = seen["raw"] + torch.relu(x @ w.down_weight + w.down_bias) @ w.up_weight + w.up_bias
    torch.testing.assert_close(seen["adapted"], hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hand, vlm_adapter(seen["raw"], w, model.config.layer_norm_epsilon))
    assert not model.transformer.h[0]._forward_hooks  # the adapter hooks came off


@pytest.mark.parametrize("pass_name", ["decoder", "encoder"])
def test_ffn_parallel_site_adds_f_of_the_post_attention_stream(backbone, pass_name):
    """x ← x + mlp(ln_2 x) + f(x): the decoder's hooks and the encoder's in-line blocks give the hand value."""
    model, vae = backbone.model, make_vae(backbone, adapter_site="ffn_parallel")
    block = model.transformer.h[0]
    ids, mask = batch(backbone)
    seen = {}
    hooks = [block.ln_2.register_forward_pre_hook(lambda m, args: seen.update(r=args[0])),
             block.mlp.register_forward_hook(lambda m, args, out: seen.update(m=out)),
             model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.update(y=args[0]))]
    try:
        if pass_name == "decoder":
            vae.decoder_logits(model, ids, mask, torch.randn(2, 4))
            w = vae.decoder_adapters.weights().map(lambda t: t[0])
        else:  # the encoder calls the parts' forward directly: recompute them from its block-0 input
            h = vae.encoder_states(model, ids, mask)
            w = vae.encoder_adapters.weights().map(lambda t: t[0])
    finally:
        for handle in hooks:
            handle.remove()

    def hand_f(r):
        return torch.relu(r @ w.down_weight + w.down_bias) @ w.up_weight + w.up_bias

    if pass_name == "decoder":
        torch.testing.assert_close(ffn_parallel_adapter(seen["r"], w), hand_f(seen["r"]))
        torch.testing.assert_close(seen["y"], seen["r"] + seen["m"] + hand_f(seen["r"]), rtol=1e-5, atol=1e-5)
    else:
        assert not seen  # no hook fired in the encoder
        t = model.transformer
        x0 = t.wte(ids) + t.wpe((mask.cumsum(-1) - 1).clamp(min=0))
        key_padding = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        x = x0 + block.attn(block.ln_1(x0), attention_mask=key_padding)[0]
        expected = t.ln_f(x + block.mlp(block.ln_2(x)) + hand_f(x))
        torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["latent_attn", "mean", "max"])
def test_pooling_against_hand(kind, backbone):
    vae = make_vae(backbone, pooling=kind, pooling_temperature=2.0)
    h = torch.randn(2, 3, backbone.model.config.n_embd)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = vae.pooling(h, mask)
    for row, n in ((0, 2), (1, 3)):
        states = h[row, :n]
        if kind == "mean":
            expected = states.mean(0)
        elif kind == "max":
            expected = states.max(0).values
        else:
            scores = torch.relu(states @ vae.pooling.score.weight[0] + vae.pooling.score.bias) / 2.0
            expected = (scores.softmax(0)[:, None] * states).sum(0)
        torch.testing.assert_close(pooled[row], expected)


def test_kv_prefix_is_one_extra_key_value_in_every_layer(backbone):
    """Layer 0's attention output recomputed by hand with K_z, V_z prepended and the first token at position 1."""
    model, vae = backbone.model, make_vae(backbone)
    ids, mask = batch(backbone, ["a man walks a dog ."])
    z = torch.randn(1, 4)
    attn = model.transformer.h[0].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out[0]))
    try:
        vae.decoder_logits(model, ids[:, :-1], mask[:, :-1], z)
    finally:
        handle.remove()
    c = model.config
    heads, d_head = c.n_head, c.n_embd // c.n_head
    q, k, v = attn.c_attn(seen["x"]).split(c.n_embd, dim=2)

    def split(t):
        return t.view(1, -1, heads, d_head).transpose(1, 2)

    k_z, v_z = vae.injector.prefix(z)[0]
    keys, values = torch.cat([k_z, split(k)], dim=2), torch.cat([v_z, split(v)], dim=2)
    scores = split(q) @ keys.transpose(-1, -2) / math.sqrt(d_head)
    t = q.shape[1]
    causal = torch.ones(t, t + 1, dtype=torch.bool).tril(diagonal=1)  # key 0 (z) always visible
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    expected = attn.c_proj((probs @ values).transpose(1, 2).reshape(1, t, c.n_embd))
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
    # the embeddings that reached the first block used positions 1..T (the latent holds cache position 0)
    x0, _ = block_io(model, 0, lambda: vae.decoder_logits(model, ids[:, :-1], mask[:, :-1], z))
    transformer = model.transformer
    positions = torch.arange(1, ids.shape[1])[None]
    torch.testing.assert_close(x0, transformer.wte(ids[:, :-1]) + transformer.wpe(positions))


def test_embedding_injection_adds_z_projection_to_every_position(backbone):
    model, vae = backbone.model, make_vae(backbone, injection="embedding")
    ids, mask = batch(backbone, ["a man walks a dog ."])
    z = torch.randn(1, 4)
    x0, _ = block_io(model, 0, lambda: vae.decoder_logits(model, ids, mask, z))
    transformer = model.transformer
    expected = transformer.wte(ids) + transformer.wpe(torch.arange(ids.shape[1])[None]) + vae.injector.embedding(z)[:, None]
    torch.testing.assert_close(x0, expected)
    assert len(transformer.drop._forward_pre_hooks) == 0


def test_encoder_is_bidirectional_and_decoder_depends_on_z(backbone):
    model, vae = backbone.model, make_vae(backbone)
    ids, mask = batch(backbone, ["a man walks a dog ."])
    changed = ids.clone()
    changed[0, -2] = (changed[0, -2] + 7) % 8000
    with torch.no_grad():
        first = vae.encoder_states(model, ids, mask)[0, 0]
        first_changed = vae.encoder_states(model, changed, mask)[0, 0]
        assert not torch.allclose(first, first_changed)  # position 0 sees the last tokens
        one, two = torch.zeros(1, 4), torch.ones(1, 4)
        assert not torch.allclose(vae.decoder_logits(model, ids, mask, one), vae.decoder_logits(model, ids, mask, two))
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_padding_does_not_change_a_sentence(backbone):
    """Right padding is masked in the encoder (pooling included) and the decoder."""
    model, vae = backbone.model, make_vae(backbone)
    with torch.no_grad():
        short, mask_short = batch(backbone, ["a dog ."])
        both, mask_both = batch(backbone, ["a dog .", "two people sit on a long wooden bench"])
        mu_short, _ = vae.encode(model, short, mask_short)
        mu_both, _ = vae.encode(model, both, mask_both)
        torch.testing.assert_close(mu_short[0], mu_both[0], rtol=1e-4, atol=1e-5)
        z = torch.randn(1, 4)
        nll_short = vae.token_nll(model, short, mask_short, z)
        nll_both = vae.token_nll(model, both, mask_both, torch.cat([z, z]))
        torch.testing.assert_close(nll_short[0], nll_both[0, : nll_short.shape[1]], rtol=1e-4, atol=1e-4)


def test_greedy_matches_teacher_forced_argmax(backbone):
    """The incremental decoder (KV cache after the latent slot) agrees with the full teacher-forced pass."""
    model, vae = backbone.model, make_vae(backbone)
    z = torch.randn(2, 4)
    eos = backbone.tokenizer.eos_token_id
    with torch.no_grad():
        out = vae.greedy(model, z, eos, eos, 6)
        for row, tokens in enumerate(out):
            ids = torch.tensor([[eos] + tokens])
            logits = vae.decoder_logits(model, ids, torch.ones_like(ids), z[row : row + 1])
            assert logits[0, :-1].argmax(-1).tolist()[: len(tokens)] == tokens


def test_bundle_parts_and_sizes(backbone):
    c = backbone.model.config
    direct = make_vae(backbone).parameter_counts()
    per_layer = make_vae(backbone, kv_projection="per_layer").parameter_counts()
    assert direct["injector"] == 4 * c.n_layer * 2 * c.n_embd
    assert per_layer["injector"] == 4 * c.n_embd + c.n_layer * (c.n_embd * 2 * c.n_embd + 2 * c.n_embd)
    assert direct["decoder_adapters"] == c.n_layer * (2 * c.n_embd + 2 * c.n_embd * 3 + 3 + c.n_embd)
    with pytest.raises(HubError, match="pooling"):
        VAEConfig(pooling="cls").validate(2)


# -- objectives and metrics ------------------------------------------------------------------------------------

def test_kl_and_gaussian_log_densities_by_hand():
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # ½(μ² + σ² − log σ² − 1): dim 0: ½(1 + 1 − 0 − 1) = 0.5; dim 1: ½(0 + 4 − log 4 − 1)
    torch.testing.assert_close(kl_per_dim(mu, logvar), torch.tensor([[0.5, 0.5 * (3 - math.log(4.0))]]))
    z = torch.tensor([[2.0, 2.0]])
    hand = -0.5 * (math.log(2 * math.pi) + 1) - 0.5 * (math.log(2 * math.pi) + math.log(4.0) + 4 / 4)
    assert float(log_normal(z, mu, logvar)) == pytest.approx(hand)
    assert float(log_standard_normal(torch.zeros(1, 3))) == pytest.approx(-1.5 * math.log(2 * math.pi))


def test_iw_estimate_and_reconstruction_by_hand():
    """With q = p(z) = N(0, 1) the weights are p(x|z_k): log p̂ = log mean_k p(x|z_k); Rec = −mean log p(x|z)."""
    z = torch.tensor([[[0.3], [-1.2]]])
    log_px_z = torch.tensor([[math.log(0.2), math.log(0.6)]])
    terms = iw_terms(log_px_z, z, torch.zeros(1, 1), torch.zeros(1, 1))
    assert float(terms["log_px"]) == pytest.approx(math.log(0.4))
    assert float(terms["rec"]) == pytest.approx(-(math.log(0.2) + math.log(0.6)) / 2)


def test_mutual_information_and_active_units():
    # identical posteriors N(0, I): q(z) = q(z|x), so the estimate is −H(q) − mean_i log N(z_i; 0, I)
    # = mean_i (½|z_i|² − nz/2) for the drawn z_i: zero in expectation
    mu, logvar = torch.zeros(5, 3), torch.zeros(5, 3)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    hand = float((0.5 * z.pow(2).sum(-1) - 1.5).mean())
    assert mutual_information(mu, logvar, torch.Generator().manual_seed(0)) == pytest.approx(hand, abs=1e-5)
    # far-apart, sharp posteriors: each z_i is explained by its own sentence only, log q(z_i) = log q(z_i|x_i) −
    # log N, so the estimate is log N plus the same sampling term (ε the standardised draws)
    far = torch.arange(4.0)[:, None].repeat(1, 2) * 100
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    hand = math.log(4) + float((0.5 * eps.pow(2).sum(-1) - 1.0).mean())
    assert mutual_information(far, torch.full((4, 2), -10.0), torch.Generator().manual_seed(0)) == pytest.approx(hand, abs=1e-3)
    # AU: unbiased variance of μ per dimension against 0.01
    mu = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.4, 0.2, 0.0]])  # variances 0.04, 0.01, 0
    assert active_units(mu) == 2


def test_lm_likelihood_ignores_other_slots_rows():
    # base vocabulary 3, added rows 3..6 of which the task owns 4 and 5 (the engine's table holds every slot's):
    # the softmax is over ids 0, 1, 2, 4, 5 only, so an unreachable row's logit takes no probability.
    logits = torch.tensor([[1.0, 2.0, 0.5, 9.0, 0.0, 3.0, 9.0]])
    masked = own_vocabulary(logits, 3, [4, 5])
    assert torch.isinf(masked[0, [3, 6]]).all()
    torch.testing.assert_close(masked.log_softmax(-1)[0, [0, 1, 2, 4, 5]],
                               logits[0, [0, 1, 2, 4, 5]].log_softmax(-1))


def test_decoder_use_of_z_tells_a_decoder_that_reads_z_from_one_that_does_not(backbone):
    sentences = ["a man walks a dog .", "two people sit on a bench", "a cat sleeps ."]
    model, vae = backbone.model, make_vae(backbone)
    reads = decoder_use_of_z(vae, model, backbone.tokenizer, sentences, batch_size=2)
    ids, mask = batch(backbone, sentences)
    with torch.no_grad():
        mu = vae.encode(model, ids, mask)[0]
        by_hand = float(vae.token_nll(model, ids, mask, mu.roll(-1, 0)).sum()) / 3
    assert reads["rec_other_mu"] == pytest.approx(by_hand, rel=1e-5)
    assert len({round(v, 3) for v in reads.values()}) == 3
    with torch.no_grad():
        vae.injector.kv.weight.zero_()  # z no longer reaches the decoder
    ignores = decoder_use_of_z(vae, model, backbone.tokenizer, sentences, batch_size=2)
    assert ignores["rec_own_mu"] == pytest.approx(ignores["rec_other_mu"]) == pytest.approx(ignores["rec_zero_z"])


def test_beta_schedules():
    # cyclical: 4 cycles of 100 steps: 25 at 0, 25 ramping, 50 at β_max
    assert [beta_at(s, 400, "cyclical") for s in (0, 24, 25, 37, 50, 99, 100, 137)] == \
        [0.0, 0.0, 0.0, pytest.approx(0.48), 1.0, 1.0, 0.0, pytest.approx(0.48)]
    assert beta_at(10, 100, "constant", beta_max=0.5) == 0.5
    # linear after a 20-step phase 1, ramp over half of the remaining 80 steps
    assert [beta_at(s, 100, "linear", start=20, ratio_increase=0.5) for s in (0, 19, 20, 40, 60, 99)] == \
        [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    with pytest.raises(HubError, match="beta schedule"):
        beta_at(0, 10, "cosine")


def test_kl_floors():
    # Dimension 0: sentence 1 is below λ = 0.5 (0.1), sentence 2 above (0.7); their batch mean 0.4 is below, so a
    # floor on batch means would treat both sentences alike. Dimension 1 is above λ for both.
    kl = torch.tensor([[0.1, 2.0], [0.7, 4.0]])  # per sentence Σ_d: 2.1, 4.7; mean 3.4
    assert float(kl_regulariser(kl, "none", 0.5)) == pytest.approx(3.4)
    assert float(kl_regulariser(kl, "total_hinge", 2.0)) == pytest.approx(4.0)  # max(3.4, 2·2), on the batch total
    assert float(kl_regulariser(kl, "total_hinge", 1.0)) == pytest.approx(3.4)
    # Optimus fb_mode 1: mean_b Σ_d KL_bd·1[KL_bd > λ] = ((0 + 2.0) + (0.7 + 4.0)) / 2 (batch means: 0 + 3.0)
    assert float(kl_regulariser(kl, "per_dim_mask", 0.5)) == pytest.approx(3.35)
    # P&L min_z: mean_b Σ_d max(KL_bd, λ) = ((0.5 + 2.0) + (0.7 + 4.0)) / 2 (batch means: 0.5 + 3.0)
    assert float(kl_regulariser(kl, "per_dim_clamp", 0.5)) == pytest.approx(3.6)


@pytest.mark.parametrize("floor", ["per_dim_mask", "per_dim_clamp"])
def test_per_dimension_floors_act_on_each_sentence(floor):
    # Below λ a sentence's dimension gets no KL gradient; above it, 1/B, whatever the other sentence does
    # (a floor on the batch mean 0.4 would give both sentences of dimension 0 no gradient).
    kl = torch.tensor([[0.1, 2.0], [0.7, 4.0]], requires_grad=True)
    kl_regulariser(kl, floor, 0.5).backward()
    assert kl.grad.tolist() == [[0.0, 0.5], [0.5, 0.5]]


def test_elbo_normalisations():
    nll = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mu, logvar = torch.tensor([[1.0], [0.0]]), torch.zeros(2, 1)  # KL 0.5 and 0
    per_sentence = elbo_loss(nll, targets, mu, logvar, 1.0, "none", 0.0, "per_sentence")
    assert float(per_sentence["loss"]) == pytest.approx(6 / 2 + 0.25)
    per_token = elbo_loss(nll, targets, mu, logvar, 1.0, "none", 0.0, "per_token")
    assert float(per_token["loss"]) == pytest.approx(6 / 3 + 0.25)
    assert float(per_token["rec"]) == pytest.approx(3.0) and float(per_token["kl"]) == pytest.approx(0.25)


def test_denoising_never_deletes_the_final_eos():
    rng = random.Random(0)
    ids = list(range(1, 11)) + [0]
    for _ in range(50):
        noisy = delete_tokens(ids, 0.4, rng)
        assert noisy[-1] == 0 and len(noisy) >= len(ids) - 4
        assert all(t in ids for t in noisy) and noisy == sorted(noisy[:-1]) + [0]
    assert delete_tokens(ids, 0.0, rng) == ids


def test_word_dropout_replaces_only_words_between_the_ends():
    ids = [0] + list(range(1, 201)) + [0]
    dropped = drop_words(ids, 0.3, random.Random(0), replacement=9999)
    assert len(dropped) == len(ids) and dropped[0] == 0 and dropped[-1] == 0
    assert all(d in (t, 9999) for d, t in zip(dropped, ids))
    assert 0.2 < sum(d == 9999 for d in dropped) / 200 < 0.4
    assert drop_words(ids, 0.0, random.Random(0), 9999) == ids


def test_word_dropout_changes_what_the_decoder_reads_not_what_it_predicts(backbone):
    model, vae = backbone.model, make_vae(backbone)
    ids, mask = batch(backbone)
    z = torch.randn(2, 4)
    inputs = ids.clone()
    inputs[:, 2] = 7
    plain, dropped = vae.token_nll(model, ids, mask, z), vae.token_nll(model, ids, mask, z, inputs)
    # targets up to the changed input are predicted from the same prefix; the ones after it see token 7
    torch.testing.assert_close(dropped[:, :2], plain[:, :2])
    assert (dropped[:, 2:] - plain[:, 2:]).abs().max() > 0


def test_interpolation_path_ends_at_both_points():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, -2.0])
    path = interpolation_path(a, b, 5)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path[2], (a + b) / 2)


def test_training_step_moves_only_the_bundle(backbone):
    """One optimiser step changes VAE parameters; GPT-2's weights (LayerNorms included) stay as they were."""
    model, vae = backbone.model, make_vae(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = batch(backbone)
    mu, logvar = vae.encode(model, ids, mask)
    nll = vae.token_nll(model, ids, mask, vae.reparameterize(mu, logvar))
    elbo_loss(nll, mask[:, 1:].float(), mu, logvar, 1.0, "none", 0.0, "per_sentence")["loss"].backward()
    assert all(p.grad is None for p in model.parameters())
    assert vae.encoder_adapters.down_weight.grad.abs().sum() > 0 and vae.injector.kv.weight.grad.abs().sum() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
