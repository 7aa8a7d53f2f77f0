"""The E2E example's beam search has the LoRA paper's semantics (gpt2_beam.py), batched and exact."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "e2e"))
import common  # noqa: E402
from beam import BeamConfig, ban_repeated_ngrams, beam_search  # noqa: E402

NEG = float("-inf")


class TokenCache:
    """A stand-in for transformers' KV cache: each row's tokens so far (what a toy model needs)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.rows = [list(self.rows[i]) for i in index.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rows = [list(row) for row in self.rows for _ in range(repeats)]


class ToyLM(torch.nn.Module):
    """A causal LM with transformers' calling convention whose next-token logits are ``next_logits(tokens)``."""

    def __init__(self, next_logits) -> None:
        super().__init__()
        self.next_logits = next_logits
        self.batch_rows: list[int] = []  # rows of each forward call
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where beam_search finds the device

    def forward(self, input_ids, attention_mask, position_ids, use_cache, past_key_values=None):
        if past_key_values is None:
            past_key_values = TokenCache([[t for t, m in zip(ids, keep, strict=True) if m]
                                          for ids, keep in zip(input_ids.tolist(), attention_mask.tolist(),
                                                               strict=True)])
        else:
            for row, token in zip(past_key_values.rows, input_ids[:, -1].tolist(), strict=True):
                row.append(token)
        self.batch_rows.append(input_ids.shape[0])
        logits = torch.tensor([self.next_logits(row) for row in past_key_values.rows], dtype=torch.float32)
        return SimpleNamespace(logits=logits[:, None, :], past_key_values=past_key_values)


def scripted(script: dict[tuple[int, ...], dict[int, float]], vocab: int):
    """Next-token logits by the longest matching suffix in ``script`` ({suffix: {token: logit}}), others -10."""
    def next_logits(tokens: list[int]) -> list[float]:
        for size in range(len(tokens), -1, -1):
            wanted = script.get(tuple(tokens[len(tokens) - size:]))
            if wanted is not None:
                return [wanted.get(t, -10.0) for t in range(vocab)]
        return [-10.0] * vocab
    return next_logits


def paper_beam(next_logits, prompt: list[int], config: BeamConfig) -> list[int]:
    """gpt2_beam.py's loop for one prompt, transcribed: fairseq's n-gram ban on the history, topk over all
    (beam, token) extensions, finished hypotheses scored sum / len ** penalty and their beams set to -inf, a final
    pass over the unfinished beams, strict > between candidates."""
    k, n = config.num_beams, config.no_repeat_ngram_size
    scores, histories, best_score, best = torch.zeros(k), [[] for _ in range(k)], None, None
    for i in range(config.max_new_tokens):
        rows = []
        for history in histories:
            logits = torch.tensor(next_logits(prompt + history), dtype=torch.float32)
            if i > 0 and n > 0 and i + 1 >= n:  # _calc_banned_ngram_tokens
                grams: dict[tuple[int, ...], list[int]] = {}
                for gram in zip(*[history[j:] for j in range(n)], strict=False):
                    grams[gram[:-1]] = grams.get(gram[:-1], []) + [gram[-1]]
                logits[grams.get(tuple(history[i + 1 - n:i]), [])] = NEG
            rows.append(logits)
        log_probs = torch.log(torch.softmax(torch.stack(rows), dim=-1))
        vocab = log_probs.shape[-1]
        candidates = log_probs[0] if i == 0 else (scores[:, None] + log_probs).flatten()
        scores, picked = candidates.topk(k, largest=True, sorted=True)
        histories = [histories[p // vocab] + [p % vocab] for p in picked.tolist()]
        for b in range(k):
            if histories[b][-1] in config.stop_ids:
                score = scores[b] / len(histories[b]) ** config.length_penalty
                if best is None or best_score < score:
                    best_score, best = score, histories[b]
                scores[b] = NEG
    for b in range(k):
        score = scores[b] / len(histories[b]) ** config.length_penalty
        if best is None or best_score < score:
            best_score, best = score, histories[b]
    return best


def random_table_lm(seed: int, vocab: int = 9, peak: float = 3.0):
    """Logits from a fixed random table indexed by the last two tokens: repeats, stops and ties of length matter."""
    table = torch.randn((vocab, vocab, vocab), generator=torch.Generator().manual_seed(seed)) * peak

    def next_logits(tokens: list[int]) -> list[float]:
        return table[tokens[-2] if len(tokens) > 1 else 0, tokens[-1]].tolist()
    return next_logits


def test_equals_the_papers_loop_in_batches_of_8_and_of_1():
    config = BeamConfig(num_beams=4, max_new_tokens=8, length_penalty=0.8, no_repeat_ngram_size=3, stop_ids=(0, 1))
    results, retired = [], False
    for seed in range(6):
        model = ToyLM(random_table_lm(seed))
        rng = torch.Generator().manual_seed(100 + seed)
        prompts = [torch.randint(2, 9, (int(torch.randint(1, 7, (1,), generator=rng)),), generator=rng).tolist()
                   for _ in range(8)]
        expected = [paper_beam(model.next_logits, p, config) for p in prompts]
        assert beam_search(model, prompts, config, pad_id=0) == expected, seed
        retired |= any(rows < 8 * 4 for rows in model.batch_rows[1:])  # settled prompts left the batch
        assert [beam_search(model, [p], config, pad_id=0)[0] for p in prompts] == expected, seed
        results += expected
    # the cases cover finished hypotheses (both stop tokens), unfinished ones and different lengths
    assert {r[-1] for r in results} >= {0, 1} and any(r[-1] > 1 for r in results)
    assert len({len(r) for r in results}) >= 4
    assert retired


def test_a_4gram_of_the_prompt_can_be_generated():
    # the model copies the prompt's 5-token value, then stops: transformers' no_repeat_ngram_size would ban the copy
    config = BeamConfig(num_beams=3, max_new_tokens=8, length_penalty=0.8, no_repeat_ngram_size=4, stop_ids=(0,))
    prompt = [5, 6, 7, 8, 9, 0]
    script = {(0,): {5: 5.0}, (5,): {6: 5.0}, (6,): {7: 5.0}, (7,): {8: 5.0}, (8,): {9: 5.0},
              (9, 0, 5, 6, 7, 8, 9): {0: 5.0}}
    assert beam_search(ToyLM(scripted(script, 10)), [prompt], config, pad_id=0) == [[5, 6, 7, 8, 9, 0]]


def test_a_4gram_repeated_inside_the_output_cannot():
    # the model wants "2 3 4 5 2 3 4 5 0"; the second "5" would repeat the 4-gram 2 3 4 5, so the next best (6) comes
    config = BeamConfig(num_beams=2, max_new_tokens=9, length_penalty=0.8, no_repeat_ngram_size=4, stop_ids=(0,))
    script = {(1,): {2: 5.0}, (2,): {3: 5.0}, (3,): {4: 5.0}, (4,): {5: 5.0, 6: 1.0}, (5,): {2: 5.0}, (6,): {0: 5.0}}
    model = ToyLM(scripted(script, 8))
    assert beam_search(model, [[1]], config, pad_id=0) == [[2, 3, 4, 5, 2, 3, 4, 6, 0]]
    off = BeamConfig(num_beams=2, max_new_tokens=9, length_penalty=0.8, no_repeat_ngram_size=0, stop_ids=(0,))
    assert beam_search(model, [[1]], off, pad_id=0) == [[2, 3, 4, 5, 2, 3, 4, 5, 2]]


def test_ban_covers_exactly_the_tokens_that_complete_a_generated_ngram():
    history = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    logits = torch.zeros(2, 10)
    ban_repeated_ngrams(logits, history, 3)
    assert (logits[0] == NEG).nonzero().flatten().tolist() == [3, 4]  # "1 2" was followed by 3 and by 4
    assert not (logits[1] == NEG).any()


@pytest.mark.parametrize(("penalty", "winner"), [(0.8, "long"), (0.0, "short")])
def test_length_penalty_divides_by_the_length_with_the_stop_token(penalty, winner):
    # short: token 2 then stop (2 tokens); long: 3 4 5 6 then stop (5 tokens), each step near-certain after the first
    p_short, p_long = 0.6, 0.4
    script = {(1,): {2: math.log(p_short), 3: math.log(p_long)}, (2,): {0: 20.0}, (3,): {4: 20.0}, (4,): {5: 20.0},
              (5,): {6: 20.0}, (6,): {0: 20.0}}
    config = BeamConfig(num_beams=2, max_new_tokens=8, length_penalty=penalty, no_repeat_ngram_size=4, stop_ids=(0,))
    short, long = math.log(p_short) / 2 ** penalty, math.log(p_long) / 5 ** penalty  # about -0.29 vs -0.25 at 0.8
    assert (long > short) == (winner == "long")
    got = beam_search(ToyLM(scripted(script, 8)), [[1]], config, pad_id=0)
    assert got == [[3, 4, 5, 6, 0] if winner == "long" else [2, 0]]


def test_every_stop_token_finishes_and_unfinished_beams_compete_at_the_last_step():
    # "7" plays GPT-2's "\n\n" (628): a second stop token
    config = BeamConfig(num_beams=2, max_new_tokens=6, length_penalty=0.8, no_repeat_ngram_size=4, stop_ids=(0, 7))
    ends_with_7 = {(1,): {2: 5.0}, (2,): {3: 5.0}, (3,): {7: 5.0}}
    assert beam_search(ToyLM(scripted(ends_with_7, 8)), [[1]], config, pad_id=0) == [[2, 3, 7]]
    never_stops = {(1,): {2: 5.0}, (2,): {3: 5.0}, (3,): {4: 5.0}, (4,): {5: 5.0}, (5,): {6: 5.0}, (6,): {2: 5.0}}
    assert beam_search(ToyLM(scripted(never_stops, 8)), [[1]], config, pad_id=0) == [[2, 3, 4, 5, 6, 2]]


def test_bad_settings_are_errors_naming_the_setting():
    with pytest.raises(ValueError, match="num_beams"):
        BeamConfig(num_beams=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        BeamConfig(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="empty prompt"):
        beam_search(ToyLM(random_table_lm(0)), [[1], []], BeamConfig(), pad_id=0)


def test_gpt2_with_cache_and_left_padding_equals_the_papers_loop_on_each_prompt_alone():
    """A real (tiny, random, float64) GPT-2: the batched search on its KV cache, prompts of different lengths
    left-padded, gives what the paper's loop gives recomputing each unpadded sequence from scratch."""
    model = common.tiny_model(vocab_size=40, eos_id=0, seed=3).double().eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(30)  # peaked next-token distributions (random init is nearly uniform)
    config = BeamConfig(num_beams=4, max_new_tokens=12, length_penalty=0.8, no_repeat_ngram_size=4, stop_ids=(0, 1))
    rng = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 40, (length,), generator=rng).tolist() for length in (5, 1, 9, 3)]

    def next_logits(tokens):
        with torch.no_grad():
            return model(input_ids=torch.tensor([tokens])).logits[0, -1].float().tolist()

    expected = [paper_beam(next_logits, p, config) for p in prompts]
    assert beam_search(model, prompts, config, pad_id=0) == expected
    assert len({tuple(e) for e in expected}) == len(expected)


class BlankLineTokenizer:
    """A stand-in for a tokenizer that encodes "\\n\\n" as ``blank`` (GPT-2: [628]), end-of-text 50256."""

    eos_token_id = 50256

    def __init__(self, blank: list[int]) -> None:
        self.blank = blank

    def __call__(self, text: str) -> dict:
        assert text == "\n\n"
        return {"input_ids": self.blank}


def test_stop_tokens_are_end_of_text_and_a_one_token_blank_line():
    import generate

    assert generate.stop_ids(BlankLineTokenizer([628])) == (50256, 628)
    assert generate.stop_ids(BlankLineTokenizer([198, 198])) == (50256,)


def test_output_text_is_cut_as_gpt2_decode_does_and_stays_one_line():
    import generate

    assert generate.clean(" The pub is cheap .<|endoftext|>!!!!") == "The pub is cheap ."
    assert generate.clean("A pub.\n\nMore text<|endoftext|>") == "A pub."
    assert generate.clean("A pub\nby the river. ") == "A pub by the river."
