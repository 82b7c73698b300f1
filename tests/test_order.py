"""The global order and its dealing to slots: folding progress never repeats or skips."""
import random

import pytest

from data_pipelines.order import Dealing, DatasetOrder, Intervals


def test_intervals_add_remove_contains():
    iv = Intervals()
    for a, b in [(5, 7), (0, 2), (2, 5), (9, 10)]:
        iv.add(a, b)
    assert iv.to_list() == [[0, 7], [9, 10]]
    iv.remove(3)
    assert iv.to_list() == [[0, 3], [4, 7], [9, 10]]
    assert 2 in iv and 3 not in iv and 9 in iv and 10 not in iv
    assert iv.count() == 7 and not iv.covers(10)
    assert Intervals([(0, 4), (4, 10)]).covers(10)


def test_order_is_a_permutation_per_epoch_and_differs_between_epochs():
    order = DatasetOrder([5, 3, 4], seed=1)
    for e in range(2):
        seen = {order.locate(e, p) for p in range(order.num_samples)}
        assert len(seen) == 12 and seen == {(s, i) for s, n in enumerate([5, 3, 4]) for i in range(n)}
    assert [order.locate(0, p) for p in range(12)] != [order.locate(1, p) for p in range(12)]


def pull(dealing, slot, cursor, base, n):
    """Pull n positions for a slot from cursor (k, q); returns positions and the new cursor."""
    k, q = cursor
    out = []
    while len(out) < n:
        e, rest = dealing.remaining(slot, k, base)
        if dealing.exhausted(e):
            break
        if q < len(rest):
            out.append((e, rest[q]))
            q += 1
        else:
            k, q = k + 1, 0
    return out, (k, q)


@pytest.mark.parametrize("sizes,slots,new_slots", [([7, 5, 6, 4, 8], 2, 3), ([7, 5], 4, 1), ([3] * 9, 4, 2)])
def test_folding_then_redealing_yields_exactly_the_unseen(sizes, slots, new_slots):
    rng = random.Random(0)
    order = DatasetOrder(sizes, seed=3)
    n = order.num_samples
    dealing = Dealing(order, slots, num_epochs=1)
    cursors, pulled, held = {}, [], []
    for s in range(slots):  # each slot pulls a different amount, holding a few back (its packing buffer)
        got, cursors[s] = pull(dealing, s, (0, 0), {}, rng.randrange(0, n // slots + 1))
        pulled += got
        held += got[-2:]
    consumed = set(pulled) - set(held)
    base = dealing.fold_cursors({}, cursors, held)
    assert {(0, p) for p in range(n) if p in base.get(0, Intervals())} == consumed
    new = Dealing(order, new_slots, num_epochs=1)
    after = []
    for s in range(new_slots):
        got, _ = pull(new, s, (0, 0), base, n + 1)
        after += got
    assert len(after) == len(set(after))
    assert set(after) == {(0, p) for p in range(n)} - consumed
