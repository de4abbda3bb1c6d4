"""The engine's scheduler alone, with no model: its plans from sequence states (who joins, who
decodes, which prompt slices fit the step's budget, which chunks are asked for, rows kept in
decode order), and what the sampled tokens make of each sequence."""

import pytest

from retro_ray.database import tokenizer
from retro_ray.serving.scheduler import EngineConfig, KVSpace, Scheduler
from retro_ray.serving.sequence import GenerationError, Request, SamplingParams, Sequence, Status

M = 4  # chunk length


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, 300, "<|endoftext|>")


def group(tok, prompt: int, new: int = 8, n: int = 1, retrieve: bool = False, fixed=None) -> list[Sequence]:
    req = Request(list(range(10, 10 + prompt)), SamplingParams(max_new_tokens=new, ignore_eos=True), retrieve, fixed)
    return [Sequence(req, tok, tok.eos_token_id) for _ in range(n)]


def step(sched: Scheduler, token: int = 7):
    """One schedule, and every sampled sequence given ``token``."""
    plan = sched.schedule()
    sched.update(plan, [token] * len(plan.sampled))
    return plan


def test_decode_rows_come_first_and_prompts_fill_the_token_budget(tok):
    sched = Scheduler(EngineConfig(kv_tokens=256, max_seqs=4, prefill_tokens=10), M)
    a, b, c = (group(tok, 8) for _ in range(3))
    for g in (a, b, c):
        sched.add(g)
    plan = step(sched)
    assert [(s.seq, s.start, s.length, s.sample) for s in plan.prefill] == [(a[0], 0, 8, True), (b[0], 0, 2, False)]
    assert plan.decode == [] and [s.status for s in (*a, *b, *c)] == [Status.RUNNING, Status.PREFILLING,
                                                                        Status.PREFILLING]
    plan = step(sched)
    assert [(s.seq, s.start, s.length) for s in plan.decode] == [(a[0], 8, 1)] and a[0].row == 0
    assert [(s.seq, s.start, s.length, s.sample) for s in plan.prefill] == [(b[0], 2, 6, True), (c[0], 0, 4, False)]
    plan = step(sched)
    assert [s.seq for s in plan.decode] == [a[0], b[0]] and [s.seq.row for s in plan.decode] == [0, 1]
    assert len(a[0].generated) == 3 and len(b[0].generated) == 2 and c[0].fed == 8 and c[0].status is Status.RUNNING


def test_first_come_first_served_and_room_comes_back(tok):
    sched = Scheduler(EngineConfig(kv_tokens=40, max_seqs=4, prefill_tokens=64), M)
    big, small = group(tok, 20, new=10), group(tok, 4, new=4)  # 30 positions, then 8: not both of 40 with a third
    third = group(tok, 10, new=10)
    for g in (big, third, small):
        sched.add(g)
    plan = step(sched)
    assert plan.admitted == [big[0]] and sched.space.used() == 30  # the third needs 20: it waits, the small one behind it too
    while not big[0].done:
        step(sched)
    plan = step(sched)
    assert plan.admitted == [third[0], small[0]] and sched.space.used() == 28
    with pytest.raises(GenerationError, match="never fit"):
        sched.check(group(tok, 30, new=20))


def test_a_completed_chunk_is_asked_for_once_and_parks_only_its_sequence(tok):
    sched = Scheduler(EngineConfig(kv_tokens=256, max_seqs=4), M)
    ret, plain = group(tok, 6, retrieve=True), group(tok, 5)
    sched.add(ret)
    sched.add(plain)
    plan = sched.schedule()
    assert plan.queries == [(ret[0], [0])] and ret[0].status is Status.RETRIEVING  # its prompt's one complete chunk
    assert [s.seq for s in plan.prefill] == [plain[0]]
    sched.update(plan, [7] * len(plan.sampled))
    plan = step(sched)
    assert plan.queries == [] and [s.seq for s in plan.slices] == [plain[0]]  # asked once; it still waits
    sched.deliver(ret[0], {0: "neighbours of chunk 0"})
    plan = step(sched)  # its prompt, then its 7th token completes no chunk, the 8th does
    assert [s.seq for s in plan.prefill] == [ret[0]] and ret[0].ready == {0: "neighbours of chunk 0"}
    step(sched)
    assert ret[0].status is Status.RETRIEVING and len(ret[0].ids) == 8
    plan = step(sched)
    assert plan.queries == [(ret[0], [1])] and [s.seq for s in plan.decode] == [plain[0]]


def test_decoding_rows_stay_first_when_one_parks(tok):
    sched = Scheduler(EngineConfig(kv_tokens=256, max_seqs=4), M)
    fixed = group(tok, 3, new=12, retrieve=True, fixed="fixed neighbours")
    seqs = [group(tok, 3, new=12)[0], group(tok, 2, new=12, retrieve=True)[0], group(tok, 3, new=12)[0]]
    for s in seqs:
        sched.add([s])
    step(sched)
    step(sched)  # the middle one's 4th token completes its first chunk: it parks
    assert seqs[1].status is Status.RETRIEVING
    plan = step(sched)
    assert [s.seq for s in plan.decode] == [seqs[0], seqs[2]] and [s.seq.row for s in plan.decode] == [0, 1]
    assert plan.moves  # the third took the parked one's row
    sched.deliver(seqs[1], {0: "n"})
    plan = step(sched)
    assert [s.seq.row for s in plan.decode] == [0, 1, 2] and sorted(s.row for s in seqs) == [0, 1, 2]
    sched.add(fixed)  # fixed neighbours (question mode): never parked
    for _ in range(3):
        step(sched)
    assert fixed[0].status is Status.RUNNING and 0 in fixed[0].encoded


def test_a_parked_row_costs_one_move_however_many_rows_decode(tok):
    sched = Scheduler(EngineConfig(kv_tokens=512, max_seqs=8), M)
    seqs = [group(tok, 2, new=12, retrieve=True)[0]] + [group(tok, 3, new=12)[0] for _ in range(5)]
    for s in seqs:
        sched.add([s])
    step(sched)
    step(sched)  # the first one's 4th token completes its first chunk: it parks
    assert seqs[0].status is Status.RETRIEVING
    plan = step(sched)  # each move carries every CCA layer's keys of two rows: the last row fills the hole
    assert plan.moves == [(5, 0)] and [s.seq.row for s in plan.decode] == [0, 1, 2, 3, 4]
    assert [s.seq for s in plan.decode] == [seqs[5], *seqs[1:5]]
    sched.deliver(seqs[0], {0: "n"})
    plan = step(sched)
    assert plan.moves == [] and [s.seq.row for s in plan.decode] == [0, 1, 2, 3, 4, 5]


def test_forks_start_from_the_prompt_and_cancelled_ones_leave(tok):
    sched = Scheduler(EngineConfig(kv_tokens=256, max_seqs=4), M)
    forks = group(tok, 6, n=3)
    sched.add(forks)
    plan = sched.schedule()
    assert [s.status for s in forks] == [Status.PREFILLING, Status.FORKED, Status.FORKED]
    assert plan.prefill[0].forks == forks[1:] and plan.sampled == forks
    sched.update(plan, [7, 8, 9])
    assert [s.generated for s in forks] == [[7], [8], [9]] and all(s.fed == 6 for s in forks)
    used = sched.space.used()
    forks[1].cancelled = True
    plan = sched.schedule()
    assert plan.finished == [forks[1]] and forks[1].finish == "cancelled" and sched.space.used() == used - 14


def test_static_admits_only_when_empty_and_the_space_coalesces(tok):
    sched = Scheduler(EngineConfig(kv_tokens=256, max_seqs=4, policy="static"), M)
    first, second = group(tok, 4, new=3), group(tok, 4, new=3)
    sched.add(first)
    step(sched)
    sched.add(second)
    while not first[0].done:
        assert step(sched).admitted == []
    assert step(sched).admitted == second
    space = KVSpace(100)
    a, b, c = space.alloc(10), space.alloc(20), space.alloc(30)
    space.release(b, 20)
    space.release(a, 10)
    space.release(c, 30)
    assert space.free == [(0, 100)] and space.alloc(100) == 0


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_stay_out_of_the_text_unless_asked_for(tok, skip):
    fox, dog = (tok(w, add_special_tokens=False)["input_ids"] for w in (" fox", " dog"))
    params = SamplingParams(max_new_tokens=len(fox) + len(dog) + 1, ignore_eos=True, skip_special_tokens=skip)
    seq = Sequence(Request([10, 11], params), tok, tok.eos_token_id)
    for token in (*fox, tok.eos_token_id, *dog):
        seq.append(token)
    assert seq.done and seq.generated == [*fox, tok.eos_token_id, *dog]
    assert seq.text == (" fox dog" if skip else " fox<|endoftext|> dog")
    assert seq.news()["completion_tokens"] == len(seq.generated)
