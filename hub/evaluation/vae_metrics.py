"""Sentence-VAE metrics, one implementation for every model the hub reports (spec §5, Optimus conventions).

    IW log-likelihood  log p̂(x) = logsumexp_k [log p(x|z_k) + log p(z_k) − log q(z_k|x)] − log k,  z_k ~ q(z|x)
    PPL                exp(−Σ_x log p̂(x) / Σ_x n_x), n_x = tokens of `<bos> x <eos>` (BOS counted, as Optimus)
    Rec, −ELBO         −E_q log p(x|z) and Rec + KL per sentence, E_q over the same k samples
    KL                 analytic Σ_d KL_d, mean over sentences
    MI                 E_x E_q log q(z|x) − E log q(z), q(z) the aggregate posterior of the whole evaluation set
    AU                 dimensions with Var_x(μ_d) ≥ 0.01 (unbiased)
    reconstruction BLEU  z = μ(x), greedy decoding, corpus sacreBLEU against x

The `lm` adapter baseline has no latent: its exact log-likelihood gives PPL with the same token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hub.adapters.vae_kind import MAX_LENGTH
from hub.task import IGNORE_INDEX, Example, collate

LOG_2PI = math.log(2 * math.pi)
AU_THRESHOLD = 0.01


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) per dimension: ½(μ² + σ² − log σ² − 1)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag σ²), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def iw_terms(log_px_z: torch.Tensor, z: torch.Tensor, mu: torch.Tensor,
             logvar: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sentence IW log-likelihood and reconstruction from k samples.

    log_px_z [B, k], z [B, k, nz], mu/logvar [B, nz] -> {"log_px": [B], "rec": [B]}."""
    log_q = log_normal(z, mu.unsqueeze(1), logvar.unsqueeze(1))
    log_w = log_px_z + log_standard_normal(z) - log_q
    k = log_px_z.shape[1]
    return {"log_px": torch.logsumexp(log_w, dim=1) - math.log(k), "rec": -log_px_z.mean(1)}


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """Optimus `calc_mi` over the whole set: mu/logvar [N, nz]; one z_i ~ q(z|x_i) per sentence."""
    n, nz = mu.shape
    neg_entropy = (-0.5 * nz * LOG_2PI - 0.5 * (1 + logvar).sum(-1)).mean()
    z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    log_density = log_normal(z.unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0))  # [N (z_i), N (q_j)]
    log_qz = torch.logsumexp(log_density, dim=1) - math.log(n)
    return float(neg_entropy - log_qz.mean())


def active_units(mu: torch.Tensor, threshold: float = AU_THRESHOLD) -> int:
    """Dimensions whose posterior mean varies across sentences: Var_x(μ_d) ≥ threshold (N − 1 denominator)."""
    return int((mu.var(dim=0, unbiased=True) >= threshold).sum())


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacreBLEU corpus BLEU (its default 13a tokeniser), one reference per hypothesis."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


@dataclass
class Totals:
    """Sums over an evaluation set, turned into the reported numbers by `report`."""

    log_px: float = 0.0
    rec: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    words: int = 0
    sentences: int = 0

    def add(self, log_px: torch.Tensor, rec: torch.Tensor | None, kl: torch.Tensor | None, tokens: int,
            words: int) -> None:
        self.log_px += float(log_px.sum())
        self.rec += float(rec.sum()) if rec is not None else 0.0
        self.kl += float(kl.sum()) if kl is not None else 0.0
        self.tokens += tokens
        self.words += words
        self.sentences += log_px.shape[0]

    def report(self) -> dict[str, float]:
        n = max(1, self.sentences)
        nll = -self.log_px / n
        return {"ppl": math.exp(-self.log_px / max(1, self.tokens)),
                "ppl_word": math.exp(-self.log_px / max(1, self.words)),
                "nll": nll, "rec": self.rec / n, "kl": self.kl / n, "neg_elbo": (self.rec + self.kl) / n,
                "sentences": self.sentences, "tokens": self.tokens}


def words_of(sentence: str) -> int:
    """Whitespace words plus the EOS (AdaVAE's `ppl_word` count)."""
    return len(sentence.split()) + 1


@torch.no_grad()
def evaluate_vae(vae, model, tokenizer, sentences: list[str], iw_samples: int = 100, max_length: int = MAX_LENGTH,
                 batch_size: int = 8, sample_chunk: int = 20, max_new_tokens: int = 40, seed: int = 0,
                 progress: bool = True) -> dict:
    """Every §5 metric of a `SentenceVAE` over `sentences` (k = `iw_samples` posterior samples per sentence)."""
    from tqdm.auto import tqdm

    from hub.adapters.vae import encode_sentences, pad_rows

    model.eval()
    vae.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    rows = encode_sentences(tokenizer, sentences, max_length)
    eos = tokenizer.eos_token_id or 0
    totals, mus, logvars, outputs = Totals(), [], [], []
    for start in tqdm(range(0, len(rows), batch_size), desc="IW evaluation", unit="batch", disable=not progress):
        batch = rows[start : start + batch_size]
        ids, mask = pad_rows(batch, device)
        mu, logvar = vae.encode(model, ids, mask)
        z = vae.reparameterize(mu.float().cpu(), logvar.float().cpu(), iw_samples, generator).to(device)
        log_px_z = torch.cat([_log_px_given_z(vae, model, ids, mask, z[:, i : i + sample_chunk])
                              for i in range(0, iw_samples, sample_chunk)], dim=1)
        terms = iw_terms(log_px_z.cpu(), z.cpu(), mu.float().cpu(), logvar.float().cpu())
        words = sum(words_of(tokenizer.decode(r[1:-1])) for r in batch)
        totals.add(terms["log_px"], terms["rec"], kl_per_dim(mu, logvar).sum(-1).cpu(), int(mask.sum()), words)
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
        outputs += vae.greedy(model, mu, eos, eos, max_new_tokens)
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    hypotheses = [tokenizer.decode(ids).strip() for ids in outputs]
    references = [tokenizer.decode(r[1:-1]).strip() for r in rows]
    return {**totals.report(), "iw_samples": iw_samples, "mi": mutual_information(mu, logvar, generator),
            "au": active_units(mu), "nz": mu.shape[1], "recon_bleu": corpus_bleu(hypotheses, references),
            "bleu_tokenizer": "sacrebleu 13a", "reconstructions": list(zip(references, hypotheses))[:10]}


def _log_px_given_z(vae, model, ids: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z) [B, c] for c samples per sentence, z [B, c, nz]."""
    b, c = z.shape[:2]
    nll = vae.token_nll(model, ids.repeat_interleave(c, 0), mask.repeat_interleave(c, 0), z.flatten(0, 1))
    return -nll.sum(-1).view(b, c)


@torch.no_grad()
def decoder_use_of_z(vae, model, tokenizer, sentences: list[str], max_length: int = MAX_LENGTH,
                     batch_size: int = 16) -> dict[str, float]:
    """How much the decoder reads z: Rec (nats per sentence, −log p(x|z)) with z = μ(x), with z = μ of the next
    sentence of the set (another sentence's code), and with z = 0 (the prior's mean). A decoder that ignores z
    gives the three the same value; what z(x) saves over another sentence's z is what it carries about x."""
    from hub.adapters.vae import encode_sentences, pad_rows

    vae.eval()
    device = next(model.parameters()).device
    rows = encode_sentences(tokenizer, sentences, max_length)
    batches = [pad_rows(rows[i : i + batch_size], device) for i in range(0, len(rows), batch_size)]
    mu = torch.cat([vae.encode(model, ids, mask)[0] for ids, mask in batches])
    codes = {"rec_own_mu": mu, "rec_other_mu": mu.roll(-1, 0), "rec_zero_z": torch.zeros_like(mu)}
    totals = dict.fromkeys(codes, 0.0)
    for start, (ids, mask) in zip(range(0, len(rows), batch_size), batches):
        for name, z in codes.items():
            totals[name] += float(vae.token_nll(model, ids, mask, z[start : start + len(ids)]).sum())
    return {name: total / len(rows) for name, total in totals.items()}


def own_vocabulary(logits: torch.Tensor, base_vocab: int, own_ids) -> torch.Tensor:
    """Logits [..., V'] with every added row but the task's own (`own_ids`) at −inf: on the serving engine V' holds
    every slot's task rows, which a task can never emit; left in, they take probability mass and raise its PPL."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[:base_vocab] = True
    keep[list(own_ids)] = True
    return logits.masked_fill(~keep, float("-inf"))


@torch.no_grad()
def evaluate_lm(task_model, sentences: list[str], max_length: int = MAX_LENGTH, batch_size: int = 32) -> dict:
    """Exact log-likelihood of an `lm` adapter (`hub.evaluation.decode.TaskModel`): PPL with the VAE's token
    count (`<bos> x <eos>`, x cut to `max_length` − 2 tokens as for the VAE)."""
    model, codec = task_model.model, task_model.codec
    device = next(model.parameters()).device
    encoded = [codec.encode_example(Example("", s), max_target=max_length - 2) for s in sentences if s.strip()]
    totals = Totals()
    model.eval()
    for start in range(0, len(encoded), batch_size):
        part = encoded[start : start + batch_size]
        batch = collate(part, task_model.pad_id, device)
        with task_model.activate():
            logits = model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"]).logits
        logits = own_vocabulary(logits[:, :-1].float(), task_model.base_vocab, codec.token_ids.values())
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels,
                                                ignore_index=IGNORE_INDEX, reduction="none").sum(-1)
        labelled = (labels != IGNORE_INDEX).sum(-1)
        words = sum(words_of(codec.tokenizer.decode([t for t in e.labels if t != IGNORE_INDEX][:-1])) for e in part)
        totals.add(-nll.cpu(), nll.cpu(), None, int(labelled.sum()) + len(part), words)  # + BOS, as Optimus
    return {**totals.report(), "exact": True}
