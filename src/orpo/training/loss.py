"""ORPO loss, naive path: pure tensor math, no logging, no devices, no Accelerate.

Hong, Lee & Thorne 2024 (arXiv 2403.07691), eqs. (4)-(7), with the paper's lambda named `beta`:

    l(y)  = (1/m) sum_t log P(y_t | x, y_<t)                    mean log-prob of the m response tokens
    z     = (l_w - l_l) - (log(1 - e^l_w) - log(1 - e^l_l))      log of the odds ratio, odds = p/(1-p)
    L     = NLL(chosen) - beta * logsigmoid(z)

The loss is split in two so the batch layout and the logits path can be swapped:
`token_logps` (full logits -> per-token log-probs; the chunked path replaces it) and `orpo_loss`
(per-token log-probs -> loss and statistics, shared by every path).

Normalisation: the NLL is a sum over the step's NLL tokens divided by `norm.nll_tokens`, the odds term a
sum over pairs divided by `norm.pairs`. Passing the counts of the whole optimizer step (every micro-batch,
every process) makes accumulated micro-batches give exactly the gradient of one big batch; passing this
micro-batch's own counts gives TRL's per-micro-batch means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.pairs import IGNORE

_LN2 = math.log(2.0)
_TINY = 1e-30  # keeps -expm1(x) > 0 in the branch that is discarded for x -> 0


@dataclass(frozen=True)
class Norm:
    """Denominators of one optimizer step (summed over micro-batches and processes)."""

    nll_tokens: float
    pairs: float


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, with finite value and gradient everywhere on x < 0.

    Two branches (Maechler 2012): log1p(-e^x) for x < -ln2, log(-expm1(x)) above. Each branch is fed
    an input that is safe for it (clamped), because torch.where backpropagates through the discarded
    branch too and 0 * inf there would make the gradient NaN. x in (-1e-30, 0] (every token certain, which
    fp32 rounding can produce) is read as -1e-30: value log(1e-30) ~ -69, gradient 0, both finite.
    """
    x = x.float()
    small = torch.clamp(x, max=-_LN2)  # safe for log1p(-exp)
    large = torch.clamp(x, min=-_LN2, max=-_TINY)  # safe for log(-expm1): argument stays > 0
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(small)), torch.log(-torch.expm1(large)))


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token, in fp32.

    logits (N, T, V) from the model, input_ids (N, T); returns (N, T-1) where [:, t] = log P(ids[t+1]).
    """
    logits = logits[:, :-1, :].float()  # (N, T-1, V)
    targets = input_ids[:, 1:].unsqueeze(-1)  # (N, T-1, 1)
    picked = torch.gather(logits, -1, targets).squeeze(-1)  # (N, T-1)
    return picked - torch.logsumexp(logits, dim=-1)  # (N, T-1)


def loss_masks(batch: dict[str, torch.Tensor], nll_on_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over next-token positions (2B, T-1): response tokens, and the chosen side's NLL tokens."""
    response = batch["labels"][:, 1:] != IGNORE  # (2B, T-1)
    if nll_on_prompt:
        nll = batch["attention_mask"][:, 1:] != 0  # (2B, T-1) every real token after the first (a new tensor)
    else:
        nll = response.clone()  # (2B, T-1)
    half = response.shape[0] // 2
    nll[half:] = False  # the NLL covers the chosen rows only
    return response, nll


def response_means(logps: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean log-prob per response token l(y), response length in tokens), both (2B,), from per-token log-probs
    (2B, T-1) and the response mask. Empty responses are dropped upstream; one here would score 0."""
    resp = response_mask.float()  # (2B, T-1)
    n_resp = resp.sum(-1)  # (2B,)
    return (logps.float() * resp).sum(-1) / n_resp.clamp(min=1), n_resp


def orpo_loss(
    logps: torch.Tensor,
    response_mask: torch.Tensor,
    nll_mask: torch.Tensor,
    beta: float,
    norm: Norm,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss of one micro-batch laid out as [chosen; rejected].

    logps (2B, T-1) per-token log-probs; response_mask, nll_mask (2B, T-1) bool.
    Returns (loss, stats): loss = sum(NLL)/norm.nll_tokens - beta * sum(logsigmoid z)/norm.pairs;
    stats are detached sums over this micro-batch (see `finish_metrics`).
    """
    logps = logps.float()
    half = logps.shape[0] // 2
    mean_logp, _ = response_means(logps, response_mask)  # (2B,) l(y)
    chosen, rejected = mean_logp[:half], mean_logp[half:]  # (B,), (B,)
    z = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # (B,)
    log_sig = F.logsigmoid(z)  # (B,)
    nll_sum = -(logps * nll_mask.float()).sum()  # ()
    loss = nll_sum / norm.nll_tokens - beta * log_sig.sum() / norm.pairs  # ()
    with torch.no_grad():
        stats = {
            "nll_sum": nll_sum.detach(),
            "nll_tokens": nll_mask.sum().float(),
            "pairs": torch.tensor(float(half), device=logps.device),
            "log_odds_ratio": log_sig.detach().sum(),
            "log_odds_chosen": z.detach().sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "orpo_sum": -log_sig.detach().sum(),
        }
    return loss, stats


def add_stats(total: dict[str, torch.Tensor] | None, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accumulate micro-batch statistics (sums)."""
    if total is None:
        return {k: v.clone() for k, v in stats.items()}
    return {k: total[k] + stats[k] for k in total}


def finish_metrics(stats: dict[str, torch.Tensor], beta: float) -> dict[str, float]:
    """Summed statistics -> TRL-named means. Sync point: moves the sums to the host."""
    s = {k: float(v) for k, v in stats.items()}  # sync point
    pairs = max(s["pairs"], 1.0)
    nll = s["nll_sum"] / max(s["nll_tokens"], 1.0)
    chosen, rejected = s["logps/chosen"] / pairs, s["logps/rejected"] / pairs
    return {
        "loss": nll + beta * s["orpo_sum"] / pairs,
        "nll_loss": nll,
        "log_odds_ratio": s["log_odds_ratio"] / pairs,
        "log_odds_chosen": s["log_odds_chosen"] / pairs,
        "rewards/chosen": beta * chosen,
        "rewards/rejected": beta * rejected,
        "rewards/margins": beta * (chosen - rejected),
        "rewards/accuracies": s["rewards/accuracies"] / pairs,
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }
