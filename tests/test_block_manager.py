"""Tests for engine/block_manager.py: paged KV bookkeeping, prefix reuse, session tails, eviction."""
from __future__ import annotations

import pytest

from engine.block_manager import SCRATCH_BLOCK, BlockManager, chain_hash
from engine.request import Request, SamplingParams

BS = 4


def make_req(tokens: list[int], session_key: str | None = None) -> Request:
    return Request(list(tokens), SamplingParams(), sink=lambda e: None, session_key=session_key)


def run_to(bm: BlockManager, req: Request, num_computed: int) -> None:
    """Pretend the engine computed the KV of ``req``'s first ``num_computed`` tokens."""
    req.num_computed = num_computed
    bm.on_computed(req)


def finished(bm: BlockManager, tokens: list[int], computed: int | None = None,
             session_key: str | None = None, keep_tail: bool = True) -> Request:
    """Allocate, compute and free a request, as one engine turn would (the last token stays uncomputed)."""
    req = make_req(tokens, session_key)
    assert bm.allocate(req)
    run_to(bm, req, len(tokens) - 1 if computed is None else computed)
    bm.free(req, keep_tail=keep_tail)
    return req


def snapshot(bm: BlockManager) -> tuple:
    return (list(bm.empty), list(bm.cached), dict(bm.hash_to_block), dict(bm.tails),
            [(b.ref_count, b.hash, b.token_ids) for b in bm.blocks])


# ---- allocation counts ------------------------------------------------------------------------------

def test_needs_two_blocks() -> None:
    with pytest.raises(ValueError):
        BlockManager(1, BS)


def test_allocate_counts_blocks_and_never_hands_out_scratch() -> None:
    bm = BlockManager(10, BS)
    assert bm.num_usable == 9 and bm.num_in_use == 0 and bm.num_reclaimable == 9
    req = make_req(list(range(10)))  # 10 tokens -> 3 blocks of 4
    assert bm.allocate(req)
    assert len(req.block_ids) == 3 and len(set(req.block_ids)) == 3
    assert SCRATCH_BLOCK not in req.block_ids
    assert req.num_computed == 0 and req.cached_tokens == 0
    assert bm.num_in_use == 3 and bm.num_reclaimable == 6
    others = [make_req([100 + i] * 8) for i in range(3)]  # 2 blocks each: 6 more -> pool full
    assert all(bm.allocate(r) for r in others)
    every = req.block_ids + [b for r in others for b in r.block_ids]
    assert sorted(every) == list(range(1, 10))
    assert bm.num_in_use == 9 and bm.num_reclaimable == 0


def test_slot_maps_positions_through_the_block_table() -> None:
    bm = BlockManager(10, BS)
    req = make_req(list(range(9)))
    assert bm.allocate(req)
    for pos in range(9):
        assert bm.slot(req, pos) == req.block_ids[pos // BS] * BS + pos % BS


def test_free_without_session_returns_every_block() -> None:
    bm = BlockManager(10, BS)
    req = make_req(list(range(10)))
    assert bm.allocate(req)
    bm.free(req)
    assert req.block_ids == [] and bm.num_in_use == 0 and bm.num_reclaimable == 9


# ---- prefix reuse ----------------------------------------------------------------------------------------

def test_on_computed_registers_only_full_blocks() -> None:
    bm = BlockManager(10, BS)
    req = make_req(list(range(11)))
    assert bm.allocate(req)
    run_to(bm, req, 3)
    assert req.block_hashes == [] and bm.hash_to_block == {}
    run_to(bm, req, 5)
    h0 = chain_hash(None, (0, 1, 2, 3))
    assert req.block_hashes == [h0]
    assert bm.hash_to_block == {h0: req.block_ids[0]}
    assert bm.blocks[req.block_ids[0]].token_ids == (0, 1, 2, 3)
    run_to(bm, req, 10)
    h1 = chain_hash(h0, (4, 5, 6, 7))
    assert req.block_hashes == [h0, h1]
    assert bm.hash_to_block == {h0: req.block_ids[0], h1: req.block_ids[1]}
    assert bm.blocks[req.block_ids[2]].hash is None  # partial block: not shareable


def test_full_blocks_are_reused_across_requests() -> None:
    bm = BlockManager(10, BS)
    a = make_req(list(range(10)))
    assert bm.allocate(a)
    run_to(bm, a, 10)
    a_blocks = list(a.block_ids)
    bm.free(a)
    assert bm.num_in_use == 0 and len(bm.cached) == 2  # two full blocks keep their content
    b = make_req(list(range(8)) + [50, 51, 52])
    assert bm.allocate(b)
    assert b.block_ids[:2] == a_blocks[:2]
    assert b.num_computed == 8
    assert len(b.block_ids) == 3 and b.block_ids[2] not in a_blocks[:2]
    assert bm.num_in_use == 3


def test_running_request_shares_blocks_it_filled() -> None:
    bm = BlockManager(10, BS)
    a = make_req(list(range(10)))
    assert bm.allocate(a)
    run_to(bm, a, 10)  # still running
    b = make_req(list(range(9)) + [77])
    assert bm.allocate(b)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert bm.blocks[a.block_ids[0]].ref_count == 2
    assert bm.num_in_use == 4  # a's 3 + b's 1 own block; shared blocks count once
    bm.free(a)
    assert bm.num_in_use == 3  # b still holds the shared blocks
    bm.free(b)
    assert bm.num_in_use == 0


def test_block_holding_the_last_prompt_token_is_never_reused() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(12)), computed=12)  # three full blocks registered
    assert len(bm.hash_to_block) == 3
    # 8 tokens: both full blocks are cached, but the last token must be computed for its logits
    same8 = make_req(list(range(8)))
    assert bm.allocate(same8)
    assert same8.num_computed == 4 and same8.num_pending == 4
    bm.free(same8)
    same12 = make_req(list(range(12)))
    assert bm.allocate(same12)
    assert same12.num_computed == 8 and same12.num_pending == 4
    bm.free(same12)
    nine = make_req(list(range(9)))
    assert bm.allocate(nine)
    assert nine.num_computed == 8 and nine.num_pending == 1


def test_reuse_follows_the_hash_chain_not_just_block_contents() -> None:
    bm = BlockManager(10, BS)
    finished(bm, [1, 1, 1, 1, 5, 6, 7, 8, 0], computed=8)
    finished(bm, [2, 2, 2, 2, 5, 6, 7, 8, 0], computed=8)
    # the second blocks hold the same tokens after different prefixes: different KV, two entries
    assert len(bm.hash_to_block) == 4
    f = make_req([2, 2, 2, 2, 5, 6, 7, 8, 9])
    assert bm.allocate(f)
    assert f.num_computed == 8
    assert bm.blocks[f.block_ids[1]].token_ids == (5, 6, 7, 8)
    assert f.block_ids[1] == bm.hash_to_block[chain_hash(chain_hash(None, (2, 2, 2, 2)), (5, 6, 7, 8))]
    assert f.block_ids[1] != bm.hash_to_block[chain_hash(chain_hash(None, (1, 1, 1, 1)), (5, 6, 7, 8))]
    g = make_req([3, 3, 3, 3, 5, 6, 7, 8, 9])  # first block differs: nothing after it is reused
    assert bm.allocate(g)
    assert g.num_computed == 0


# ---- session tails -----------------------------------------------------------------------------------------

def test_session_tail_is_kept_and_reused_by_the_next_turn() -> None:
    bm = BlockManager(10, BS)
    first = list(range(11))  # prompt + output; 10 computed (the last sampled token never is)
    a = make_req(first, "s")
    assert bm.allocate(a)
    run_to(bm, a, 10)
    tail_block, parent = a.block_ids[2], a.block_hashes[1]
    bm.free(a)
    tail = bm.tails["s"]
    assert (tail.block_id, tail.index, tail.parent_hash, tail.token_ids) == (tail_block, 2, parent, (8, 9))
    assert bm.num_in_use == 1  # the tail stays allocated to its session
    b = make_req(first + [20, 21, 22], "s")
    assert bm.allocate(b)
    assert b.block_ids[2] == tail_block
    assert b.num_computed == 10  # exactly what the first turn computed
    assert "s" not in bm.tails
    assert len(b.block_ids) == bm.blocks_for(14)


def test_tail_reuse_stops_at_the_common_prefix() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s")  # tail holds tokens 8, 9
    b = make_req(list(range(9)) + [99, 98], "s")
    assert bm.allocate(b)
    assert b.num_computed == 9
    assert bm.tails == {}


def test_tail_reuse_is_bounded_by_the_last_prompt_token() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s")  # tail holds tokens 8, 9
    b = make_req(list(range(10)), "s")  # the same 10 tokens: the last one must still be computed
    assert bm.allocate(b)
    assert b.num_computed == 9 and b.num_pending == 1


def test_diverging_prompt_does_not_reuse_the_tail() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s")
    tail_block = bm.tails["s"].block_id
    inside = make_req(list(range(8)) + [70, 71, 72], "s")  # diverges at the first tail token
    assert bm.allocate(inside)
    assert inside.num_computed == 8 and tail_block not in inside.block_ids
    assert bm.tails["s"].block_id == tail_block  # not consumed
    early = make_req([90] + list(range(1, 11)), "s")  # diverges in the first block
    assert bm.allocate(early)
    assert early.num_computed == 0 and tail_block not in early.block_ids


def test_another_session_gets_full_blocks_but_not_the_tail() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s")
    other = make_req(list(range(11)) + [5], "t")
    assert bm.allocate(other)
    assert other.num_computed == 8
    assert "s" in bm.tails and bm.tails["s"].block_id not in other.block_ids


def test_free_with_keep_tail_false_keeps_no_tail() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s", keep_tail=False)
    assert bm.tails == {}
    assert bm.num_in_use == 0
    assert len(bm.cached) == 2  # full blocks stay reusable


def test_new_tail_replaces_the_sessions_old_one() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s")
    old = bm.tails["s"].block_id
    finished(bm, [40, 41, 42, 43, 44, 45, 46], session_key="s")  # diverges: a new tail at index 1
    assert bm.tails["s"].index == 1 and bm.tails["s"].block_id != old
    assert len(bm.tails) == 1
    assert old in bm.empty


def test_drop_tail() -> None:
    bm = BlockManager(10, BS)
    finished(bm, list(range(11)), session_key="s")
    block = bm.tails["s"].block_id
    bm.drop_tail("s")
    assert bm.tails == {} and bm.num_in_use == 0 and block in bm.empty
    bm.drop_tail("s")  # unknown session: nothing happens
    bm.drop_tail("nobody")
    assert bm.num_in_use == 0
    again = make_req(list(range(11)) + [1], "s")
    assert bm.allocate(again)
    assert again.num_computed == 8  # full blocks only


# ---- eviction ------------------------------------------------------------------------------------------

def test_eviction_takes_empty_then_cached_then_tails() -> None:
    bm = BlockManager(5, BS)  # 4 usable blocks
    finished(bm, [1, 2, 3, 4, 5, 6, 7], session_key="s")  # block 0 cached, block 1 the tail
    cached_block = bm.hash_to_block[chain_hash(None, (1, 2, 3, 4))]
    tail_block = bm.tails["s"].block_id
    assert (len(bm.empty), len(bm.cached), len(bm.tails)) == (2, 1, 1)
    x = make_req([9] * 8)
    assert bm.allocate(x)
    assert cached_block not in x.block_ids and tail_block not in x.block_ids
    assert len(bm.cached) == 1 and "s" in bm.tails
    y = make_req([8])
    assert bm.allocate(y)
    assert y.block_ids == [cached_block]
    assert bm.hash_to_block == {} and bm.blocks[cached_block].hash is None  # its content is forgotten
    assert "s" in bm.tails
    z = make_req([7])
    assert bm.allocate(z)
    assert z.block_ids == [tail_block] and bm.tails == {}
    assert not bm.allocate(make_req([6]))
    assert bm.num_in_use == 4


def test_cached_blocks_are_evicted_least_recently_used_first() -> None:
    bm = BlockManager(5, BS)
    finished(bm, [1, 2, 3, 4, 0])
    a0 = bm.hash_to_block[chain_hash(None, (1, 2, 3, 4))]
    finished(bm, [5, 6, 7, 8, 0])
    b0 = bm.hash_to_block[chain_hash(None, (5, 6, 7, 8))]
    assert list(bm.cached) == [a0, b0]
    finished(bm, [1, 2, 3, 4, 9])  # reuses a0: now the most recently used
    assert list(bm.cached) == [b0, a0]
    big = make_req([30] * 12)  # 3 blocks: the 2 empty ones, then the LRU cached block
    assert bm.allocate(big)
    assert b0 in big.block_ids and a0 not in big.block_ids
    assert chain_hash(None, (5, 6, 7, 8)) not in bm.hash_to_block
    assert bm.hash_to_block == {chain_hash(None, (1, 2, 3, 4)): a0}


def test_tails_are_evicted_least_recently_used_first() -> None:
    bm = BlockManager(4, BS)  # 3 usable
    finished(bm, [1, 2], session_key="old")
    finished(bm, [3, 4], session_key="new")
    old, new = bm.tails["old"].block_id, bm.tails["new"].block_id
    x = make_req([5, 6, 7, 8, 9])  # 2 blocks: the empty one, then the oldest tail
    assert bm.allocate(x)
    assert old in x.block_ids and new not in x.block_ids
    assert list(bm.tails) == ["new"]


# ---- refusal, reserve, decode growth -----------------------------------------------------------------------

def test_allocate_refuses_without_changing_anything() -> None:
    bm = BlockManager(6, BS)  # 5 usable
    finished(bm, list(range(11)), session_key="s")  # 2 cached full blocks + a tail
    hog = make_req([50] * 8)
    assert bm.allocate(hog)  # takes both empty blocks: only the 2 cached blocks and the tail are left
    before = snapshot(bm)
    req = make_req(list(range(11)) + list(range(100, 110)), "s")  # reuses all 3 of them, needs 3 more
    assert not bm.allocate(req)
    assert snapshot(bm) == before
    assert req.block_ids == [] and req.num_computed == 0 and req.cached_tokens == 0
    assert req.block_hashes == []


def test_reserve_leaves_blocks_spare() -> None:
    bm = BlockManager(6, BS)  # 5 usable
    req = make_req(list(range(8)))  # 2 blocks
    assert not bm.allocate(req, reserve=4)
    assert bm.num_in_use == 0 and req.block_ids == []
    assert bm.allocate(req, reserve=3)
    assert bm.num_in_use == 2


def test_reserve_does_not_count_reused_cached_blocks_as_spare() -> None:
    bm = BlockManager(5, BS)  # 4 usable
    finished(bm, [1, 2, 3, 4, 0])  # one cached block; 4 reclaimable in all
    req = make_req([1, 2, 3, 4] + [9] * 12)  # hits the cached block and needs 3 new ones
    assert not bm.allocate(req, reserve=1)  # the hit is no longer spare: 3 + 1 > 3
    assert bm.num_in_use == 0 and len(bm.cached) == 1
    assert bm.allocate(req, reserve=0)
    assert req.num_computed == 4 and bm.num_in_use == 4


def test_ensure_slot_grows_one_block_at_a_time() -> None:
    bm = BlockManager(4, BS)  # 3 usable
    req = make_req([1, 2, 3, 4])
    assert bm.allocate(req)
    run_to(bm, req, 4)
    assert bm.ensure_slot(req) and len(req.block_ids) == 1  # the last token's block already exists
    req.tokens.append(5)  # a sampled token whose KV is computed next step, in a new block
    assert bm.ensure_slot(req) and len(req.block_ids) == 2
    assert bm.ensure_slot(req) and len(req.block_ids) == 2  # idempotent
    other = make_req([7])
    assert bm.allocate(other)
    req.tokens += [6, 7, 8, 9]
    before = list(req.block_ids)
    assert not bm.ensure_slot(req)  # pool exhausted
    assert req.block_ids == before


def test_ensure_slot_evicts_a_tail_when_nothing_else_is_left() -> None:
    bm = BlockManager(3, BS)  # 2 usable
    finished(bm, [1, 2], session_key="s")
    req = make_req([1, 2, 3, 4])
    assert bm.allocate(req)
    req.tokens.append(5)
    assert bm.ensure_slot(req)
    assert bm.tails == {} and len(req.block_ids) == 2
