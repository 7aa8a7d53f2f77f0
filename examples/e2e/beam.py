"""The LoRA paper's beam search (examples/NLG/src/gpt2_beam.py), batched, on a Hugging Face causal LM's KV cache.

Its semantics, which transformers' ``generate`` does not have:

- no-repeat n-grams look at the generated tokens only: a 4-gram of the prompt (a slot value) can be copied, a 4-gram
  repeated within the output cannot;
- each step keeps the top ``num_beams`` of all (beam, token) extensions; an extension that ends in a stop token is a
  finished hypothesis scored ``sum of log-probabilities / length ** length_penalty`` (length counts the generated
  tokens, the stop token included), and its beam is dropped (score -inf) rather than replaced by the next best;
- every step up to ``max_new_tokens`` runs; then the unfinished beams are scored at that length too, and the best
  hypothesis seen wins (the earliest, and the lowest beam, on ties).

Stopping early is exact here: once a prompt has a finished hypothesis that none of its live beams can beat at any later
length (a beam's score only falls, so ``score / max_new_tokens ** length_penalty`` bounds it for a non-negative
penalty), later steps cannot change its result, and it leaves the batch; the search ends when no prompt is left.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BeamConfig:
    """The paper's decoding settings (its README's gpt2_beam.py command for E2E)."""

    num_beams: int = 10
    max_new_tokens: int = 64
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    stop_ids: tuple[int, ...] = (50256, 628)  # <|endoftext|> and "\n\n" in GPT-2's vocabulary

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if not self.stop_ids:
            raise ValueError("stop_ids must name at least one token")


def ban_repeated_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int) -> None:
    """Set to -inf, in place, each row's tokens that would complete an n-gram already in that row's ``history``."""
    if n == 0 or history.shape[1] < n:
        return
    windows = history.unfold(1, n, 1)  # (rows, count, n): every n-gram generated so far
    prefix = history[:, history.shape[1] - n + 1:]  # the last n-1 tokens
    rows, starts = (windows[:, :, :-1] == prefix[:, None, :]).all(-1).nonzero(as_tuple=True)
    logits[rows, windows[rows, starts, -1]] = float("-inf")


def _keep_best(best_score, best_tokens, found, live: list[int], scores, history) -> None:
    """Record, for each live prompt, the first highest of ``scores`` (live prompts x beams; -inf: not a candidate) if
    it beats that prompt's best so far (or is its first)."""
    top, beam = scores.max(dim=1)  # max returns the first maximal index
    ids = torch.tensor(live, device=scores.device)
    better = torch.isfinite(top) & (~found[ids] | (top > best_score[ids]))
    for i in better.nonzero().flatten().tolist():
        best_score[live[i]], found[live[i]] = top[i], True
        best_tokens[live[i]] = history[i * scores.shape[1] + beam[i]].tolist()


@torch.inference_mode()
def beam_search(model, prompts: Sequence[Sequence[int]], config: BeamConfig, pad_id: int,
                adapters: Sequence[str | None] | None = None) -> list[list[int]]:
    """The best hypothesis of each prompt: its generated tokens, the final stop token included when it has one.

    Prompts of different lengths are left-padded with ``pad_id`` (masked, with positions counted from each prompt's
    first token), so a prompt's result does not depend on its batch; a prompt whose result is settled leaves the
    batch. With ``adapters`` (one fastlora adapter name, or None, per prompt), each prompt's beams run with its
    adapter through ``fastlora.use_adapters``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("beam_search needs at least one prompt and no empty prompt")
    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
    device = next(model.parameters()).device
    count, k, width = len(prompts), config.num_beams, max(map(len, prompts))
    ids = torch.full((count, width), pad_id, dtype=torch.long)
    mask = torch.zeros((count, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt))
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    stop = torch.tensor(config.stop_ids, device=device)
    # transformers 5 renamed past_key_values to cache (in the arguments and the output)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    live = list(range(count))  # the prompts still searched, in batch order

    def forward(tokens, attention, position, cache=None):
        per_prompt = tokens.shape[0] // len(live)
        names = None if adapters is None else [adapters[b] for b in live for _ in range(per_prompt)]
        with _adapters(model, names):
            out = model(input_ids=tokens, attention_mask=attention, position_ids=position, use_cache=True,
                        **{cache_name: cache})
        return out.logits[:, -1].float(), getattr(out, cache_name)

    logits, cache = forward(ids, mask, positions)  # the prompts once; every beam starts from the same state
    if not hasattr(cache, "reorder_cache"):
        raise RuntimeError(f"beam_search needs a transformers version whose {type(model).__name__} returns a Cache "
                           f"object (got {type(cache).__name__})")
    cache.batch_repeat_interleave(k)
    mask, position = mask.repeat_interleave(k, 0), positions[:, -1:].repeat_interleave(k, 0)
    logits = logits.repeat_interleave(k, 0)
    beam_scores = torch.zeros((count, k), device=device)
    history = torch.empty((count * k, 0), dtype=torch.long, device=device)
    best_score = torch.full((count,), float("-inf"), device=device)
    found = torch.zeros(count, dtype=torch.bool, device=device)
    best_tokens: list[list[int]] = [[] for _ in range(count)]
    beam_rows = torch.arange(k, device=device)
    for step in range(config.max_new_tokens):
        ban_repeated_ngrams(logits, history, config.no_repeat_ngram_size)
        log_probs = torch.log(torch.softmax(logits, dim=-1)).view(len(live), k, -1)  # as the paper: log of softmax
        vocab = log_probs.shape[-1]
        if step == 0:  # all beams are the same: extend the first only
            candidates = log_probs[:, 0]
        else:
            candidates = (beam_scores[:, :, None] + log_probs).view(len(live), -1)
        beam_scores, picked = candidates.topk(k, dim=1, largest=True, sorted=True)
        rows = (picked // vocab + torch.arange(len(live), device=device)[:, None] * k).flatten()
        tokens = (picked % vocab).flatten()
        history = torch.cat((history[rows], tokens[:, None]), dim=1)
        cache.reorder_cache(rows)
        finished = torch.isin(tokens, stop).view(len(live), k)
        if finished.any():
            length_norm = (step + 1) ** config.length_penalty
            _keep_best(best_score, best_tokens, found, live,
                       torch.where(finished, beam_scores / length_norm, float("-inf")), history)
            beam_scores = beam_scores.masked_fill(finished, float("-inf"))
        if step + 1 == config.max_new_tokens:
            _keep_best(best_score, best_tokens, found, live,
                       beam_scores / config.max_new_tokens ** config.length_penalty, history)
            break
        if config.length_penalty >= 0:  # settled: a best exists that no live beam can beat at any later length
            ids = torch.tensor(live, device=device)
            bound = (beam_scores / config.max_new_tokens ** config.length_penalty).max(dim=1).values
            settled = found[ids] & (bound <= best_score[ids])
            if bool(settled.all()):
                break
            if bool(settled.any()):
                keep = (~settled).nonzero().flatten()
                rows = (keep[:, None] * k + beam_rows).flatten()
                cache.reorder_cache(rows)
                history, mask, position, tokens = history[rows], mask[rows], position[rows], tokens[rows]
                beam_scores, live = beam_scores[keep], [live[i] for i in keep.tolist()]
        mask = torch.cat((mask, mask.new_ones((len(live) * k, 1))), dim=1)
        position = position + 1
        logits, cache = forward(tokens[:, None], mask, position, cache)
    return best_tokens


def _adapters(model, names: list[str | None] | None):
    if names is None:
        return contextlib.nullcontext()
    import fastlora

    return fastlora.use_adapters(model, names)
