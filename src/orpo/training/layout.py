"""Batch layouts: tokenized pairs -> the rows one forward pass reads, and where each scored token lands.

Both layouts end in the same place: per-token log-probs on a grid of shape (2b, W) for the b pairs of a
pass, chosen rows first, where grid[i, t] is log P(token t+1 | tokens <= t) of pair i's chosen sequence
prompt+chosen (row b+i: prompt+rejected), and two masks on that grid (`response`, `nll`). This is exactly
what the plain layout has always produced, so `loss.orpo_loss` reads either layout unchanged.

plain (the reference): [chosen; rejected] as 2b separate rows, right-padded to the longest (data.pairs.collate),
    full logits over every position.

packed (the default): each pair is one sequence  prompt | chosen | rejected.
    - positions: prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1 again (the positions it has alone);
    - attention: causal within the pair, and rejected tokens do not see chosen tokens, so both responses
      read the prompt's keys and values, computed once;
    - scored tokens: the hidden state of the last prompt token scores the first token of both responses;
      with nll_on_prompt the prompt's own next-token log-probs are scored once, on the chosen grid row;
    - several pairs share a row (no attention across pairs) and the rows of one pass are padded only at
      their end. `pack` decides how the step's pairs are laid into rows and passes under a token budget;
      which pairs form a step never changes (the sampler decides), so the gradient does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..config import Config
from ..data.pairs import collate
from ..model.fast.attention import CHOSEN, PAD, PROMPT, REJECTED, SPLIT
from .loss import loss_masks

ONE_ROW_KERNELS = ("flex_attention", SPLIT)  # kernels whose cost does not grow with a row's other pairs


@dataclass
class Batch:
    """One forward pass: model inputs and the scored-token grid of its b pairs."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L) 1 on real tokens, 0 on padding
    response: torch.Tensor  # (2b, W) bool: response tokens of every sequence
    nll: torch.Tensor  # (2b, W) bool: NLL tokens (chosen rows only)
    tokens: int  # prompt+chosen plus prompt+rejected tokens of the b pairs, whatever the layout
    # packed layout only (None in the plain layout)
    position_ids: torch.Tensor | None = None  # (R, L)
    segment: torch.Tensor | None = None  # (R, L) index of the pair in its row; -1 on padding
    role: torch.Tensor | None = None  # (R, L) PAD / PROMPT / CHOSEN / REJECTED
    source: torch.Tensor | None = None  # (N,) index into the (R*L) hidden states that scores each token
    target: torch.Tensor | None = None  # (N,) the token id scored there
    dest: torch.Tensor | None = None  # (N,) index into the flattened (2b*W) grid
    spans: tuple | None = None  # per row, (offset, P, C, R) of each pair in it (attention.split_attention)

    @property
    def packed(self) -> bool:
        return self.source is not None

    @property
    def pairs(self) -> int:
        return self.response.shape[0] // 2

    def to(self, device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})


def plain_batch(records: list[dict], pad_id: int, nll_on_prompt: bool) -> Batch:
    """The reference layout: `data.pairs.collate`'s (2b, T) rows; the grid is its next-token positions (2b, T-1)."""
    rows = collate(records, pad_id)
    response, nll = loss_masks(rows, nll_on_prompt)
    return Batch(rows["input_ids"], rows["attention_mask"], response, nll, int(rows["attention_mask"].sum()))


def pair_length(record: dict) -> int:
    """Tokens of a pair in the packed layout: prompt + chosen + rejected."""
    return len(record["prompt_ids"]) + len(record["chosen_ids"]) + len(record["rejected_ids"])


def pack(lengths: list[int], max_tokens: int, one_row: bool = False) -> list[list[list[int]]]:
    """Pairs (by packed length) -> passes -> rows -> pair indices.

    Rows: first-fit decreasing into rows of at most min(longest pair, budget) tokens (the budget if
    `one_row`), so a row is never longer than the longest pair unless asked (a dense attention mask costs
    row length squared). Passes: rows longest first, each pass as many rows as fit rows x its longest row
    <= `max_tokens`. A pair longer than the budget gets a row and a pass of its own.
    """
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    capacity = max_tokens if one_row else min(max(lengths), max_tokens)
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for r, u in enumerate(used):
            if u + lengths[i] <= capacity:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    passes: list[list[list[int]]] = []
    longest = 0  # the current pass's first (longest) row
    for r in sorted(range(len(rows)), key=lambda r: (-used[r], r)):
        if passes and (len(passes[-1]) + 1) * longest <= max_tokens:
            passes[-1].append(rows[r])
        else:
            passes.append([rows[r]])
            longest = used[r]
    return passes


def packed_batch(rows: list[list[dict]], pad_id: int, nll_on_prompt: bool) -> Batch:
    """Pairs laid into rows (each a list of tokenized pairs) -> one packed forward pass (see module doc)."""
    records = [r for row in rows for r in row]
    b = len(records)
    width = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in records) - 1
    length = max(sum(pair_length(r) for r in row) for row in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # (R, L)
    positions = torch.zeros(shape, dtype=torch.long)  # (R, L)
    segment = torch.full(shape, -1, dtype=torch.long)  # (R, L)
    role = torch.full(shape, PAD, dtype=torch.long)  # (R, L)
    response = torch.zeros((2 * b, max(width, 1)), dtype=torch.bool)  # (2b, W)
    nll = torch.zeros_like(response)  # (2b, W)
    source, target, dest, spans = [], [], [], []
    i = 0  # pair index within the pass
    for r, row in enumerate(rows):
        offset = 0
        spans.append([])
        for s, rec in enumerate(row):
            prompt, chosen, rejected = rec["prompt_ids"], rec["chosen_ids"], rec["rejected_ids"]
            p, c, n = len(prompt), len(chosen), len(rejected)
            spans[-1].append((offset, p, c, n))
            end = offset + p + c + n
            input_ids[r, offset:end] = torch.tensor(prompt + chosen + rejected)
            positions[r, offset:end] = torch.cat([torch.arange(p + c), torch.arange(p, p + n)])
            segment[r, offset:end] = s
            role[r, offset:end] = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * n)
            base = r * length + offset  # flat index of the pair's first token
            # Grid column t scores sequence token t+1 from the hidden state of token t (see plain layout).
            # Chosen: sequence token t sits at base + t. Rejected: tokens past the prompt sit C later.
            first = max(p - 1, 0)  # the first column that scores a response token
            if nll_on_prompt and p > 1:
                t = torch.arange(0, p - 1)
                source.append(base + t)
                target.append(torch.tensor(prompt[1:]))
                dest.append(i * response.shape[1] + t)
                nll[i, : p - 1] = True
            for side, ids, grid_row, shift in ((CHOSEN, chosen, i, 0), (REJECTED, rejected, b + i, c)):
                t = torch.arange(first, p + len(ids) - 1)  # columns scoring response tokens
                src = base + t + shift
                if p > 0:
                    src[0] = base + p - 1  # the last prompt token scores both responses' first token
                source.append(src)
                target.append(torch.tensor((prompt + ids)[first + 1 : p + len(ids)]))
                dest.append(grid_row * response.shape[1] + t)
                response[grid_row, first : p + len(ids) - 1] = True
                if side == CHOSEN:
                    nll[i, first : p + len(ids) - 1] = True
            offset = end
            i += 1
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records)
    return Batch(
        input_ids=input_ids,
        attention_mask=(role != PAD).long(),
        response=response,
        nll=nll,
        tokens=tokens,
        position_ids=positions,
        segment=segment,
        role=role,
        source=torch.cat(source),
        target=torch.cat(target),
        dest=torch.cat(dest),
        spans=tuple(tuple(row) for row in spans),
    )


@dataclass(frozen=True)
class Layout:
    """How pairs become forward passes (config.layout), fixed for a run."""

    kind: str  # "packed" or "plain"
    pad_id: int
    nll_on_prompt: bool
    max_tokens: int  # packed: token budget of one pass, padding included
    one_row: bool = False  # packed: one row per pass (ONE_ROW_KERNELS)

    def passes(self, groups: list[list[dict]]) -> int:
        """How many forward passes `batches(groups)` gives, without building them."""
        if self.kind == "plain":
            return sum(1 for g in groups if g)
        return len(pack([pair_length(r) for g in groups for r in g], self.max_tokens, self.one_row))

    def batches(self, groups: list[list[dict]]) -> list[Batch]:
        """The micro-batches of one step (lists of tokenized pairs, sampler order) -> forward passes.

        plain: one pass per micro-batch, as given. packed: all pairs of the step packed under the budget.
        """
        if self.kind == "plain":
            return [plain_batch(g, self.pad_id, self.nll_on_prompt) for g in groups if g]
        records = [r for g in groups for r in g]
        plan = pack([pair_length(r) for r in records], self.max_tokens, self.one_row)
        return [packed_batch([[records[i] for i in row] for row in rows], self.pad_id, self.nll_on_prompt) for rows in plan]


def token_budget(config: Config, batch_size: int, device_type: str) -> int:
    """Tokens of one packed pass: config.max_tokens_per_batch, else a default that keeps a pass small on a CPU,
    where matmuls are already efficient at a few hundred tokens and activation memory grows with every token;
    on a GPU it is a full plain micro-batch's tokens."""
    if config.max_tokens_per_batch is not None:
        return config.max_tokens_per_batch
    return config.max_length if device_type == "cpu" else 2 * batch_size * config.max_length


def make_layout(config: Config, pad_id: int, batch_size: int, device: torch.device, kernel: str | None) -> Layout:
    """The run's layout for passes of `batch_size` pairs per micro-batch on `device` with attention `kernel`."""
    budget = token_budget(config, batch_size, device.type)
    return Layout(config.layout, pad_id, config.nll_on_prompt, budget, one_row=kernel in ONE_ROW_KERNELS)
