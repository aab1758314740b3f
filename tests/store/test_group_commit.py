"""Group commit: what arrives while a batch runs goes together in the next one, and each item gets its own outcome."""

from epost.store.group_commit import GroupCommit
from fakes import ClockReactor, HeldThreadPool


def outcomes(deferreds):
    seen = []
    for d in deferreds:
        d.addCallbacks(lambda r: seen.append(("ok", r)), lambda f: seen.append(("error", f.getErrorMessage())))
    return seen


def test_items_arriving_during_a_batch_go_together_in_the_next():
    pool, batches = HeldThreadPool(), []

    def run(items):
        batches.append(items)
        return [item * 10 for item in items]

    group = GroupCommit(ClockReactor(), pool, run)
    first = outcomes([group.submit(1)])
    later = outcomes([group.submit(n) for n in (2, 3, 4)])
    assert len(pool.calls) == 1  # one batch at a time
    pool.run_one()
    assert batches == [[1]] and first == [("ok", 10)] and later == []
    pool.run_one()
    assert batches == [[1], [2, 3, 4]] and later == [("ok", 20), ("ok", 30), ("ok", 40)]
    assert pool.calls == []


def test_an_error_result_fails_its_item_alone_and_a_raised_one_fails_the_batch():
    pool = HeldThreadPool()
    group = GroupCommit(ClockReactor(), pool, lambda items: [ValueError(f"bad {i}") if i % 2 else None for i in items])
    seen = outcomes([group.submit(n) for n in (0, 1)])  # 0 alone, then 1
    pool.run_one()
    pool.run_one()
    assert seen == [("ok", None), ("error", "bad 1")]

    def broken(items):
        raise OSError("disk gone")

    group = GroupCommit(ClockReactor(), pool, broken)
    seen = outcomes([group.submit(n) for n in (0, 1, 2)])
    pool.run_one()
    pool.run_one()
    assert seen == [("error", "disk gone")] * 3
    assert pool.calls == []
