"""Tests for engine/sampler.py: batched per-row sampling on hand-made logits."""
from __future__ import annotations

import pytest
import torch

from engine.request import SamplingParams
from engine.sampler import Sampler

V = 16
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)


def sampler(rows: int = 8, vocab: int = V) -> Sampler:
    return Sampler(vocab, rows, CPU)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def draw(s: Sampler, logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """``n`` independent draws from one row's logits, one call per draw (one generator for all)."""
    g = gen(seed)
    return [s.sample(logits.view(1, -1), [0], [params], [g])[0] for _ in range(n)]


def test_greedy_rows_take_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, V)
    tokens = sampler().sample(logits, list(range(5)), [GREEDY] * 5, [None] * 5)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_logits_beyond_the_vocabulary_are_ignored() -> None:
    logits = torch.zeros(1, V + 8)
    logits[0, 3] = 1.0
    logits[0, V + 2] = 100.0  # padding column of the lm_head
    assert sampler().sample(logits, [0], [GREEDY], [None]) == [3]


def test_top_k_one_equals_greedy() -> None:
    torch.manual_seed(1)
    s = sampler()
    for _ in range(10):
        logits = torch.randn(4, V)
        params = [SamplingParams(temperature=1.5, top_k=1)] * 4
        assert s.sample(logits, list(range(4)), params, [gen(i) for i in range(4)]) == \
            logits.argmax(dim=-1).tolist()


def test_top_k_keeps_only_the_k_most_likely() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, 2.8, 2.7] + [2.6] * (V - 5))
    seen = set(draw(sampler(), logits, SamplingParams(temperature=1.0, top_k=3), 300))
    assert seen == {1, 2, 3}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = torch.tensor([1.0, 1.2, 0.9] + [0.5] * (V - 3))  # nearly flat: sampling would spread
    assert set(draw(sampler(), logits, SamplingParams(temperature=1.0, top_p=1e-3), 200)) == {1}
    assert len(set(draw(sampler(), logits, SamplingParams(temperature=1.0), 200))) > 5


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30))
    # 0.5 + 0.3 = 0.8 < 0.85: the third token is needed, the fourth is not
    assert set(draw(sampler(), logits, SamplingParams(temperature=1.0, top_p=0.85), 500)) == {0, 1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_top() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08] + [0.0] * (V - 4))
    logits = torch.log(probs.clamp_min(1e-30))
    # min_p 0.2: the threshold is 0.1; 0.12 passes and 0.08 does not
    assert set(draw(sampler(), logits, SamplingParams(temperature=1.0, min_p=0.2), 500)) == {0, 1, 2}
    assert set(draw(sampler(), logits, SamplingParams(temperature=1.0), 500)) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    s = sampler()
    pen = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    s.start_row(0, [0, 5])  # tokens 0 and 5 are in row 0's prompt
    positive = torch.full((1, V), -10.0)
    positive[0, 0], positive[0, 1] = 2.0, 1.5  # 2.0 / 2 = 1.0 < 1.5
    assert s.sample(positive, [0], [pen], [None]) == [1]
    s.start_row(0, [0, 5])
    negative = torch.full((1, V), -10.0)
    negative[0, 0], negative[0, 1] = -1.0, -1.5  # -1.0 * 2 = -2.0 < -1.5 (dividing would give -0.5)
    assert s.sample(negative, [0], [pen], [None]) == [1]
    s.start_row(0, [5])  # token 0 not seen: no penalty
    assert s.sample(negative, [0], [pen], [None]) == [0]
    s.start_row(0, [0, 5])
    assert s.sample(positive, [0], [GREEDY], [None]) == [0]  # penalty 1: untouched


def test_repetition_penalty_is_per_row_and_follows_sampled_tokens() -> None:
    s = sampler()
    pen = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    logits = torch.full((2, V), -10.0)
    logits[:, 2], logits[:, 3] = 3.0, 2.0
    s.start_row(0, [2])
    s.start_row(1, [7])
    assert s.sample(logits, [0, 1], [pen, pen], [None, None]) == [3, 2]
    # row 1 has now produced token 2; row 0 has produced token 3 as well
    assert s.sample(logits, [0, 1], [pen, pen], [None, None]) == [2, 3]
    s.start_row(1, [])  # a new request in row 1 starts clean
    assert s.sample(logits[1:], [1], [pen], [None]) == [2]


def test_seeded_rows_reproduce_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(2)
    steps = [torch.randn(V) for _ in range(20)]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7)

    def run(layout: list[str]) -> list[int]:
        s = sampler()
        gens = {"seeded": gen(7), "other": gen(99)}
        params = {"seeded": seeded, "other": SamplingParams(temperature=0.8), "greedy": GREEDY,
                  "default": SamplingParams(temperature=1.3)}
        out = []
        for logits in steps:
            batch = torch.stack([logits if name == "seeded" else torch.randn(V) for name in layout])
            tokens = s.sample(batch, list(range(len(layout))), [params[n] for n in layout],
                              [gens.get(n) for n in layout])
            out.append(tokens[layout.index("seeded")])
        return out

    alone = run(["seeded"])
    assert run(["greedy", "other", "seeded", "default"]) == alone
    assert run(["default", "seeded", "other"]) == alone
    greedy = [int(x.argmax()) for x in steps]
    assert alone != greedy  # it really sampled


def test_different_seeds_give_different_tokens() -> None:
    torch.manual_seed(3)
    steps = torch.randn(30, V)
    p = SamplingParams(temperature=1.0)
    a = [sampler().sample(x.view(1, -1), [0], [p], [gen(1)])[0] for x in steps]
    b = [sampler().sample(x.view(1, -1), [0], [p], [gen(2)])[0] for x in steps]
    assert a != b


def test_mixed_rows_keep_their_own_behaviour() -> None:
    logits = torch.tensor([1.0, 1.2, 0.9, 1.1] + [0.0] * (V - 4)).repeat(4, 1)
    params = [GREEDY, SamplingParams(temperature=1.0, top_p=1e-3), SamplingParams(temperature=1.0, top_k=2),
              SamplingParams(temperature=2.0)]
    s = sampler()
    seen: list[set[int]] = [set() for _ in params]
    g = gen(0)
    for _ in range(300):
        for row, token in enumerate(s.sample(logits, [0, 1, 2, 3], params, [g] * 4)):
            seen[row].add(token)
    assert seen[0] == {1}
    assert seen[1] == {1}
    assert seen[2] == {1, 3}
    assert len(seen[3]) > 8


def test_sampling_follows_softmax_of_logits_over_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature, n = 0.7, 6000
    s = Sampler(len(logits), n, CPU)
    params = [SamplingParams(temperature=temperature)] * n
    tokens = s.sample(logits.repeat(n, 1), list(range(n)), params, [gen(1234)] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double()

    def chi2(p: torch.Tensor) -> float:
        expected = p.double() * n
        return float(((counts - expected) ** 2 / expected).sum())

    # 7 degrees of freedom: 24.3 is the 0.1% critical value
    assert chi2(torch.softmax(logits / temperature, -1)) < 24.3
    assert chi2(torch.softmax(logits, -1)) > 100  # the test can tell the temperature apart


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=1.5), dict(repetition_penalty=0.0), dict(max_new_tokens=0)])
def test_sampling_params_reject_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_presence_and_frequency_penalties_follow_generated_tokens_only() -> None:
    s = sampler()
    s.start_row(0, [3], generated=[5, 5])  # 3 is only in the prompt; 5 was generated twice
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 5], logits[0, 7] = 1.0, 1.5, 0.9
    presence = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert s.sample(logits.clone(), [0], [presence], [None]) == [3]  # 5 -> 0.5; 3 untouched (prompt only)
    s.start_row(0, [3], generated=[5, 5])
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    assert s.sample(logits.clone(), [0], [freq], [None]) == [3]  # 5 -> 1.5 - 2 * 0.3 = 0.9 < 1.0
    s.start_row(0, [3], generated=[5])
    assert s.sample(logits.clone(), [0], [freq], [None]) == [5]  # once: 1.5 - 0.3 = 1.2 still wins
    assert s.sample(logits.clone(), [0], [freq], [None]) == [3]  # the sample counted: 1.5 - 0.6 = 0.9 < 1.0
    with pytest.raises(ValueError):
        SamplingParams(presence_penalty=2.5)
