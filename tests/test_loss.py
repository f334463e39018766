"""Tests for orpo.training.loss: hand-worked numbers, a stable log1mexp, accumulation, and parity with TRL 1.16.

Notation (see loss.py): a = ln 2; l = mean log-prob of the response tokens; p = e^l; odds = p / (1 - p);
z = log(odds_w / odds_l) = (l_w - l_l) - (log(1 - e^l_w) - log(1 - e^l_l)); L = NLL - beta * logsigmoid(z).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from conftest import PAIRS
from orpo.data.pairs import IGNORE, TokenSpec, end_of_turn_id, to_messages, tokenize_pair
from orpo.training.layout import plain_batch
from orpo.training.logps import forward_logps
from orpo.training.loop import global_norm
from orpo.training.loss import Norm, add_stats, finish_metrics, log1mexp, loss_masks, orpo_loss

A = math.log(2.0)
LN2 = math.log(2.0)
METRICS = (
    "loss",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
ONE_PROCESS = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: t)  # stands in for Accelerator

# ---------------------------------------------------------------- 1. hand math

# Two pairs, T = 6 tokens, so 5 next-token positions; position t scores token t+1. P prompt, R response, _ pad.
#   row 0 chosen 0    P P P R R _   response [0 0 1 1 0]  logps [-2a -3a  -a  -a  -9]   l_w0 = -a   (p 1/2, odds 1)
#   row 1 chosen 1    P P R R R R   response [0 1 1 1 1]  logps [ -a  -a -3a -3a  -a]   l_w1 = -2a  (p 1/4, odds 1/3)
#   row 2 rejected 0  P P P R R R   response [0 0 1 1 1]  logps [ -5  -5 -2a -3a -4a]   l_l0 = -3a  (p 1/8, odds 1/7)
#   row 3 rejected 1  P P R R _ _   response [0 1 1 0 0]  logps [ -5  -a  -a  -9  -9]   l_l1 = -a   (p 1/2, odds 1)
# Rejected 0 (3 tokens) is longer than chosen 0 (2); pad positions (-9) and rejected prompts (-5) must not count.
HAND_ATTENTION = [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
HAND_LABELS = [
    [IGNORE, IGNORE, IGNORE, 7, 8, IGNORE],
    [IGNORE, IGNORE, 7, 8, 9, 10],
    [IGNORE, IGNORE, IGNORE, 7, 8, 9],
    [IGNORE, IGNORE, 7, 8, IGNORE, IGNORE],
]
HAND_LOGPS = [
    [-2 * A, -3 * A, -A, -A, -9.0],
    [-A, -A, -3 * A, -3 * A, -A],
    [-5.0, -5.0, -2 * A, -3 * A, -4 * A],
    [-5.0, -A, -A, -9.0, -9.0],
]


def hand_batch() -> dict[str, torch.Tensor]:
    labels = torch.tensor(HAND_LABELS)  # (4, 6)
    return {"input_ids": labels.clamp(min=0), "attention_mask": torch.tensor(HAND_ATTENTION), "labels": labels}


def hand_logps() -> torch.Tensor:
    return torch.tensor(HAND_LOGPS, dtype=torch.float32, requires_grad=True)  # (4, 5)


def test_loss_masks_by_hand():
    """response = labels[:, 1:] != -100; NLL = chosen rows only, attention[:, 1:] with the prompt, else response.

    NLL tokens: with prompt 4 (row 0) + 5 (row 1) = 9; response only 2 + 4 = 6. The batch is left unchanged.
    """
    batch = hand_batch()
    before = {k: v.clone() for k, v in batch.items()}
    response, nll = loss_masks(batch, nll_on_prompt=True)
    assert response.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert nll.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0] * 5, [0] * 5]
    _, nll_response = loss_masks(batch, nll_on_prompt=False)
    assert nll_response.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0] * 5, [0] * 5]
    assert int(nll.sum()) == 9 and int(nll_response.sum()) == 6
    for key, value in before.items():
        assert torch.equal(batch[key], value), key


def test_loss_masks_leaves_a_bool_attention_mask_alone():
    """Regression: `attention_mask[:, 1:].bool()` was a view for a bool mask, so `nll[half:] = False`
    cleared the rejected rows' attention mask in the caller's batch."""
    batch = hand_batch()
    batch["attention_mask"] = batch["attention_mask"].bool()
    before = batch["attention_mask"].clone()
    loss_masks(batch, nll_on_prompt=True)
    assert torch.equal(batch["attention_mask"], before)


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_orpo_loss_by_hand(nll_on_prompt):
    """Loss and its gradient w.r.t. the per-token log-probs, beta = 0.1, Norm = the batch's own counts.

    z0 = log(1 / (1/7)) = log 7, logsigmoid = log(7/8);  z1 = log((1/3) / 1) = -log 3, logsigmoid = log(1/4).
    Odds term: -0.1 * (log(7/8) + log(1/4)) / 2 = -0.05 * log(7/32)  (= +0.0761...).
    NLL with prompt: rows 0 and 1, (2a+3a+a+a) + (a+a+3a+3a+a) = 16a over 9 tokens; response only: 10a / 6.
    Gradient: NLL positions get -1/N. d logsigmoid(z)/dz = sigmoid(-z) = 1/8, 3/4; dz/dl_w = 1/(1-p_w) = 2, 4/3;
    dz/dl_l = -1/(1-p_l) = -8/7, -2. So dL/dl = -0.05 * sigmoid(-z) * dz/dl: l_w0 -1/80, l_w1 -1/20, l_l0 +1/140,
    l_l1 +3/40, spread evenly over the 2, 4, 3, 2 response tokens: -1/160, -1/80, +1/420, +3/80 each.
    Pads and the rejected prompt get 0; so does the chosen prompt when the NLL skips it.
    """
    logps = hand_logps()
    response, nll = loss_masks(hand_batch(), nll_on_prompt)
    n = 9 if nll_on_prompt else 6
    loss, stats = orpo_loss(logps, response, nll, beta=0.1, norm=Norm(nll_tokens=n, pairs=2))
    nll_value = 16 * A / 9 if nll_on_prompt else 10 * A / 6
    assert loss.item() == pytest.approx(nll_value - 0.05 * math.log(7 / 32), rel=1e-6)
    loss.backward()
    p = 1.0 if nll_on_prompt else 0.0  # the chosen prompt positions are NLL tokens or not
    expected = torch.tensor(
        [
            [-p / n, -p / n, -1 / n - 1 / 160, -1 / n - 1 / 160, 0.0],
            [-p / n, -1 / n - 1 / 80, -1 / n - 1 / 80, -1 / n - 1 / 80, -1 / n - 1 / 80],
            [0.0, 0.0, 1 / 420, 1 / 420, 1 / 420],
            [0.0, 3 / 80, 3 / 80, 0.0, 0.0],
        ]
    )
    assert_close(logps.grad, expected, rtol=1e-5, atol=1e-7)
    # Stats are sums over this micro-batch, independent of Norm.
    assert stats["nll_sum"].item() == pytest.approx(16 * A if nll_on_prompt else 10 * A, rel=1e-6)
    assert stats["nll_tokens"].item() == n and stats["pairs"].item() == 2


def test_orpo_loss_divides_by_the_given_norm():
    """With the step's global counts (say 20 NLL tokens over 5 pairs) the micro-batch contributes
    16a/20 - 0.1 * log(7/32) / 5 = 0.5545 + 0.0305; the stats stay this micro-batch's sums (16a, 9, 2)."""
    response, nll = loss_masks(hand_batch(), nll_on_prompt=True)
    loss, stats = orpo_loss(hand_logps(), response, nll, beta=0.1, norm=Norm(nll_tokens=20, pairs=5))
    assert loss.item() == pytest.approx(16 * A / 20 - 0.1 * math.log(7 / 32) / 5, rel=1e-6)
    assert stats["nll_sum"].item() == pytest.approx(16 * A, rel=1e-6)
    assert (stats["nll_tokens"].item(), stats["pairs"].item()) == (9, 2)


def hand_metrics(beta: float) -> dict[str, float]:
    """finish_metrics of the hand batch (NLL with prompt), worked out:
    loss = 16a/9 - beta/2 * log(7/32); nll_loss = 16a/9; log_odds_ratio = mean logsigmoid z = log(7/32) / 2;
    log_odds_chosen = mean z = (log 7 - log 3) / 2; logps/chosen = (-a - 2a)/2 = -1.5a; logps/rejected =
    (-3a - a)/2 = -2a; rewards = beta * logps; margins = beta * 0.5a; accuracies = (1 + 0) / 2."""
    return {
        "loss": 16 * A / 9 - beta / 2 * math.log(7 / 32),
        "nll_loss": 16 * A / 9,
        "log_odds_ratio": math.log(7 / 32) / 2,
        "log_odds_chosen": math.log(7 / 3) / 2,
        "rewards/chosen": beta * -1.5 * A,
        "rewards/rejected": beta * -2 * A,
        "rewards/margins": beta * 0.5 * A,
        "rewards/accuracies": 0.5,
        "logps/chosen": -1.5 * A,
        "logps/rejected": -2 * A,
    }


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_finish_metrics_by_hand(beta):
    """Every TRL-named metric of the hand batch equals the worked numbers (see hand_metrics)."""
    response, nll = loss_masks(hand_batch(), nll_on_prompt=True)
    loss, stats = orpo_loss(hand_logps(), response, nll, beta=beta, norm=Norm(9, 2))
    metrics = finish_metrics(stats, beta)
    want = hand_metrics(beta)
    assert set(metrics) == set(METRICS)
    for key in METRICS:
        assert metrics[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_add_stats_over_micro_batches_gives_the_whole_batch_metrics():
    """Pair 0 and pair 1 as two micro-batches (rows [0, 2] and [1, 3]); summed stats give the hand metrics."""
    batch, logps = hand_batch(), hand_logps().detach()
    total = None
    for rows in ([0, 2], [1, 3]):
        part = {k: v[rows] for k, v in batch.items()}
        response, nll = loss_masks(part, nll_on_prompt=True)
        _, stats = orpo_loss(logps[rows], response, nll, beta=0.1, norm=Norm(9, 2))
        total = add_stats(total, stats)
    metrics, want = finish_metrics(total, 0.1), hand_metrics(0.1)
    for key in METRICS:
        assert metrics[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key


# ---------------------------------------------------------------- 2. log1mexp


def naive_log1mexp(x: torch.Tensor) -> torch.Tensor:
    """TRL 1.16's two-branch form: right values, but torch.where backpropagates through the unused branch."""
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def test_log1mexp_matches_float64():
    """log1mexp(x) = float64 log1p(-exp(x)) for x in [-50, -1e-7] (fp32 inputs), both sides of -ln 2 included,
    and it decreases monotonically across the branch switch."""
    x = -torch.logspace(-7, math.log10(50), 3001, dtype=torch.float64)  # (3001,)
    x = torch.cat([x, torch.tensor([-LN2 - 1e-6, -LN2, -LN2 + 1e-6], dtype=torch.float64)]).float()
    got = log1mexp(x)
    assert got.dtype == torch.float32
    assert_close(got.double(), torch.log1p(-torch.exp(x.double())), rtol=1e-6, atol=0.0)
    ordered = log1mexp(torch.sort(x).values)
    assert bool((ordered[1:] <= ordered[:-1]).all())


@pytest.mark.parametrize("v", [-1e-3, -1e-6, -1e-8, -1e-12, -1e-20, -1e-30])
def test_log1mexp_value_and_gradient_near_zero(v):
    """Finite and correct near 0-: value log(-expm1(x)) ~ log(-x), gradient -1/expm1(-x) ~ 1/x (float64 refs)."""
    x = torch.tensor(v, dtype=torch.float32, requires_grad=True)
    y = log1mexp(x)
    y.backward()
    xv = float(x.detach())
    assert math.isfinite(y.item()) and math.isfinite(x.grad.item())
    assert y.item() == pytest.approx(math.log(-math.expm1(xv)), rel=1e-6)
    assert x.grad.item() == pytest.approx(-1.0 / math.expm1(-xv), rel=1e-5)


@pytest.mark.parametrize("v", [-1e-35, -1e-38, -1e-40, -1.4e-45, -0.0, 0.0])
def test_log1mexp_finite_at_the_limit(v):
    """Below |x| = 1e-30 (subnormals, 0) the value is clamped near log(1e-30) = -69.1: still finite, and
    the gradient is finite (0) instead of inf/NaN."""
    x = torch.tensor(v, dtype=torch.float32, requires_grad=True)
    y = log1mexp(x)
    y.backward()
    assert math.isfinite(y.item()) and y.item() <= math.log(1e-30) + 1e-3
    assert math.isfinite(x.grad.item())


@pytest.mark.parametrize("v", [-1e-8, -1e-20, 0.0])
def test_naive_two_branch_log1mexp_has_nan_gradient(v):
    """Why ours clamps each branch: the unused log1p(-exp(x)) branch has derivative -e^x / (1 - e^x) = -inf
    once exp(x) rounds to 1 in fp32 (x > -3e-8); torch.where multiplies it by 0 -> NaN. Ours stays finite."""
    x = torch.tensor(v, dtype=torch.float32, requires_grad=True)
    naive_log1mexp(x).backward()
    assert math.isnan(x.grad.item())
    ours = torch.tensor(v, dtype=torch.float32, requires_grad=True)
    log1mexp(ours).backward()
    assert math.isfinite(ours.grad.item())
    if v < 0:  # where the naive value is defined, the two agree on the value
        assert log1mexp(x.detach()).item() == pytest.approx(naive_log1mexp(x.detach()).item(), rel=1e-6)


def test_naive_and_ours_agree_away_from_zero():
    """Away from the trap the naive form and ours agree on value and gradient (x = -1e-3, -0.5, -2, -20)."""
    x1 = torch.tensor([-1e-3, -0.5, -2.0, -20.0], requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    log1mexp(x1).sum().backward()
    naive_log1mexp(x2).sum().backward()
    assert_close(x1.grad, x2.grad, rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------- 3. near-certain tokens, length limit


def reference_loss(logps, response, nll, beta, norm) -> float:
    """float64 loss from the formula, with log(1 - e^l) = log(-expm1(l)) (exact for l -> 0-)."""
    logps, response, nll = logps.double(), response.double(), nll.double()
    half = logps.shape[0] // 2
    mean = ((logps * response).sum(-1) / response.sum(-1)).tolist()
    out = -(logps * nll).sum().item() / norm.nll_tokens
    for lw, ll in zip(mean[:half], mean[half:], strict=True):
        z = (lw - ll) - (math.log(-math.expm1(lw)) - math.log(-math.expm1(ll)))
        out -= beta * -math.log1p(math.exp(-z)) / norm.pairs
    return out


NEAR = -1e-9  # per-token log-prob of a near-certain token


@pytest.mark.parametrize("side", ["chosen", "rejected", "both"])
def test_orpo_loss_near_certain_responses(side):
    """Per-token log-probs of -1e-9 (l -> 0-): loss equals the float64 formula, loss and gradient are finite.
    E.g. chosen: z = (-1e-9 + 2 ln 2) - (log 1e-9 - log(3/4)) = 22.4, odds term ~ beta * e^-22.4."""
    response = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)  # (4, 4)
    nll = torch.zeros_like(response)
    nll[:2] = True
    values = torch.full((4, 4), -2 * LN2)  # (4, 4) p = 1/4 elsewhere
    if side in ("chosen", "both"):
        values[:2] = NEAR
    if side in ("rejected", "both"):
        values[2:] = NEAR
    logps = values.clone().requires_grad_(True)
    norm = Norm(float(nll.sum()), 2.0)
    loss, stats = orpo_loss(logps, response, nll, beta=0.1, norm=norm)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logps.grad).all())
    assert loss.item() == pytest.approx(reference_loss(values, response, nll, 0.1, norm), rel=1e-5)
    assert all(math.isfinite(v) for v in finish_metrics(stats, 0.1).values())
    assert logps.grad[response].abs().min() > 0  # every response token still gets a gradient


def test_orpo_loss_with_log_probs_exactly_zero():
    """In fp32 a token whose logit leads by > ~17 gets log-prob exactly 0, so l = 0 happens: still finite."""
    response = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.bool)  # (2, 3)
    nll = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)  # (2, 3)
    logps = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, -0.5, -0.5]], requires_grad=True)  # (2, 3)
    loss, _ = orpo_loss(logps, response, nll, beta=0.1, norm=Norm(3, 1))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logps.grad).all())
    assert loss.item() < 1.0  # NLL 1/3 + a near-zero odds term (chosen is certain)


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model_dir)


@pytest.fixture(scope="module")
def model(chat_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32, attn_implementation="eager")
    return net.eval()


def spec_for(tokenizer, max_length=64, max_prompt_length=32, keep_end=True) -> TokenSpec:
    return TokenSpec(None, end_of_turn_id(tokenizer), max_length, max_prompt_length, keep_end)


def params_grads(model, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


LONG_PAIR = {
    "prompt": "What is the capital of France? " * 6 + "Add 2 and 3.",
    "chosen": "The capital of France is Paris. " * 5,
    "rejected": "The sky is blue. The sky is green. " * 6,
}


@pytest.mark.parametrize("keep_end", [True, False])
def test_pair_at_the_length_limit_trains(tokenizer, model, keep_end):
    """A long prompt cut to max_prompt_length = 12 (its end or its start) and responses cut to
    max_length - 12 = 28 tokens: forward + backward on the tiny model give a finite loss and finite grads."""
    spec = spec_for(tokenizer, max_length=40, max_prompt_length=12, keep_end=keep_end)
    full = tokenize_pair(to_messages(LONG_PAIR), tokenizer, spec_for(tokenizer, 10_000, 5_000))
    pair = tokenize_pair(to_messages(LONG_PAIR), tokenizer, spec)
    assert pair["drop"] == "" and len(full["prompt_ids"]) > 12 and len(full["chosen_ids"]) > 28
    assert pair["prompt_ids"] == (full["prompt_ids"][-12:] if keep_end else full["prompt_ids"][:12])
    assert pair["chosen_ids"] == full["chosen_ids"][:28] and pair["rejected_ids"] == full["rejected_ids"][:28]
    short = tokenize_pair(to_messages(PAIRS[1]), tokenizer, spec)
    batch = plain_batch([pair, short], tokenizer.pad_token_id, nll_on_prompt=True)  # (4, 40)
    assert batch.input_ids.shape == (4, 40)
    logps = forward_logps(model, batch)  # (4, 39)
    loss, _ = orpo_loss(logps, batch.response, batch.nll, beta=0.1, norm=global_norm([batch], ONE_PROCESS))
    grads = params_grads(model, loss)
    assert torch.isfinite(loss)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ---------------------------------------------------------------- 4. gradient accumulation

MIXED_PAIRS = [
    PAIRS[0],  # chosen 9 tokens, rejected 8
    PAIRS[1],
    PAIRS[2],
    {"prompt": "Add 2 and 3.", "chosen": "5.", "rejected": "The answer is 6. The answer is 6, not 5."},  # rejected longer
]


@pytest.fixture(scope="module")
def records(tokenizer):
    out = [tokenize_pair(to_messages(p), tokenizer, spec_for(tokenizer)) for p in MIXED_PAIRS]
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in out]
    assert all(not r["drop"] for r in out)
    assert len(set(lengths)) == len(lengths) and any(c < r for _, c, r in lengths)  # lengths differ
    return out


def micro_step(model, records, pad_id, nll_on_prompt, beta, norm=None):
    """Our naive path on one micro-batch: (loss, stats, parameter grads); norm None = its own counts."""
    batch = plain_batch(records, pad_id, nll_on_prompt)
    logps = forward_logps(model, batch)  # (2B, T-1)
    if norm is None:
        norm = global_norm([batch], ONE_PROCESS)
    loss, stats = orpo_loss(logps, batch.response, batch.nll, beta, norm)
    return loss, stats, params_grads(model, loss)


@pytest.mark.parametrize("nll_on_prompt", [True, False])
def test_accumulation_with_global_norm_equals_one_big_batch(model, tokenizer, records, nll_on_prompt):
    """4 pairs in one micro-batch (Norm = its counts) vs 4 micro-batches of 1 pair, each divided by the
    step's global counts (train.global_norm): same summed gradient and metrics. TRL-style per-micro-batch
    means (own counts, averaged over 4) weight each pair's NLL tokens by 1/its own count: a different gradient."""
    pad, beta = tokenizer.pad_token_id, 0.1
    loss_big, stats_big, grads_big = micro_step(model, records, pad, nll_on_prompt, beta)
    micro = [plain_batch([r], pad, nll_on_prompt) for r in records]
    norm = global_norm(micro, ONE_PROCESS)
    assert norm == global_norm([plain_batch(records, pad, nll_on_prompt)], ONE_PROCESS) and norm.pairs == 4
    summed, stats, loss_sum = [torch.zeros_like(g) for g in grads_big], None, 0.0
    per_micro = [torch.zeros_like(g) for g in grads_big]
    for r in records:
        loss, s, grads = micro_step(model, [r], pad, nll_on_prompt, beta, norm)
        summed = [a + g for a, g in zip(summed, grads, strict=True)]
        stats, loss_sum = add_stats(stats, s), loss_sum + loss.item()
        _, _, own = micro_step(model, [r], pad, nll_on_prompt, beta)  # TRL: each micro-batch its own mean
        per_micro = [a + g / len(records) for a, g in zip(per_micro, own, strict=True)]
    assert loss_sum == pytest.approx(loss_big.item(), rel=1e-6)
    for got, want in zip(summed, grads_big, strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-6)
    big, acc = finish_metrics(stats_big, beta), finish_metrics(stats, beta)
    for key in METRICS:
        assert acc[key] == pytest.approx(big[key], rel=1e-5, abs=1e-6), key
    scale = max(float(g.abs().max()) for g in grads_big)
    gap = max(float((a - b).abs().max()) for a, b in zip(per_micro, grads_big, strict=True))
    assert gap > 1e-3 * scale  # per-micro-batch means are not the big-batch gradient when lengths differ


# ---------------------------------------------------------------- 5. parity with TRL 1.16


def trl_batch(records, pad_id) -> dict[str, torch.Tensor]:
    """TRL's batch dict from our tokenized pairs: each side right-padded on its own, labels -100 on prompt/pad."""
    out = {}
    for side in ("chosen", "rejected"):
        rows = [r["prompt_ids"] + r[f"{side}_ids"] for r in records]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T_side)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T_side)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # (B, T_side)
        for i, (row, r) in enumerate(zip(rows, records, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, len(r["prompt_ids"]) : len(row)] = torch.tensor(r[f"{side}_ids"])
        out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels}
    return out


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_matches_trl_orpo_trainer(model, tokenizer, records, tmp_path, beta):
    """Same model, same tokens: our loss, all ten metrics and the parameter gradient equal TRL 1.16's
    ORPOTrainer.get_batch_loss_metrics (NLL over the chosen prompt+response, Norm = this batch's counts)."""
    pytest.importorskip("trl")
    import datasets
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=True,
        max_length=64,
        disable_dropout=True,
    )
    trainer = ORPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS[:2]), processing_class=tokenizer
    )
    pad = tokenizer.pad_token_id
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, trl_batch(records, pad))
    trl_grads = params_grads(model, trl_loss)

    loss, stats, grads = micro_step(model, records, pad, nll_on_prompt=True, beta=beta)
    ours = finish_metrics(stats, beta)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)
    assert ours["loss"] == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-5)
    for key in METRICS[1:]:
        assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-5), key
    for got, want in zip(grads, trl_grads, strict=True):
        assert_close(got, want, rtol=1e-5, atol=1e-6)
