"""The global order and its dealing to slots: folding progress never repeats or skips."""
import random

import numpy as np

import pytest

from data_pipelines.order import Dealing, DatasetOrder, Intervals


def test_intervals_add_remove_contains():
    iv = Intervals()
    for a, b in [(5, 7), (0, 2), (2, 5), (9, 10)]:
        iv.add(a, b)
    assert iv.to_list() == [[0, 7], [9, 10]]
    iv.remove_positions([3])
    assert iv.to_list() == [[0, 3], [4, 7], [9, 10]]
    assert 2 in iv and 3 not in iv and 9 in iv and 10 not in iv
    assert iv.count() == 7 and not iv.covers(10)
    assert Intervals([(0, 4), (4, 10)]).covers(10)


def test_intervals_contains_follows_every_change_and_pickles_without_its_cache():
    import pickle
    iv = Intervals([(0, 4)])
    p = np.arange(12)
    assert iv.contains(p).tolist() == [True] * 4 + [False] * 8
    iv.add(6, 8)
    assert iv.contains(p).tolist() == [True] * 4 + [False] * 2 + [True] * 2 + [False] * 4
    iv.add_ranges([(10, 12)])
    iv.remove_positions([1, 7])
    want = [True, False, True, True, False, False, True, False, False, False, True, True]
    assert iv.contains(p).tolist() == want
    again = pickle.loads(pickle.dumps(iv))
    assert again._arrays is None and again.contains(p).tolist() == want


def test_order_is_a_permutation_per_epoch_and_differs_between_epochs():
    order = DatasetOrder([5, 3, 4], seed=1)
    for e in range(2):
        seen = {order.locate(e, p) for p in range(order.num_samples)}
        assert len(seen) == 12 and seen == {(s, i) for s, n in enumerate([5, 3, 4]) for i in range(n)}
    assert [order.locate(0, p) for p in range(12)] != [order.locate(1, p) for p in range(12)]


def test_an_order_survives_pickling_for_spawned_workers():
    import pickle
    order = DatasetOrder([5, 3, 4], seed=1)
    copy = pickle.loads(pickle.dumps(order))
    assert [copy.locate(1, p) for p in range(12)] == [order.locate(1, p) for p in range(12)]


def pull(dealing, slot, cursor, base, n):
    """Pull n positions for a slot from cursor (g, q); returns (epoch, position) pairs and the new cursor."""
    g, q = cursor
    out = []
    while len(out) < n and not dealing.group_exhausted(slot, g):
        epochs, positions = dealing.remaining(slot, g, base)
        if q < len(positions):
            out.append((int(epochs[q]), int(positions[q])))
            q += 1
        else:
            g, q = g + 1, 0
    return out, (g, q)


def test_a_group_interleaves_its_units_each_in_its_own_order():
    order = DatasetOrder([50] * 16, seed=3)
    dealing = Dealing(order, slots=2, num_epochs=1, in_flight=4)
    assert dealing.whole_shards  # 16 shards >= 2 slots x 4: a unit is a whole shard
    epochs, positions = dealing.remaining(0, 0, {})
    shards = [order.locate(0, int(p))[0] for p in positions]
    units = [set(range(*dealing.unit_range(0, i))) for _, i in dealing.group(0, 0)]
    assert len(positions) == 200 and set(epochs) == {0}
    assert len(set(shards[:20])) == 4  # the first 20 pulls already draw on all four shards
    for unit in units:  # each unit's positions come in their own (ascending) order
        mine = [int(p) for p in positions if p in unit]
        assert mine == sorted(unit)
    again = Dealing(order, 2, num_epochs=1, in_flight=4).remaining(0, 0, {})[1]
    assert (again == positions).all()  # the merge order is seeded, not drawn


def test_fewer_shards_than_slots_x_in_flight_are_cut_into_equal_slices():
    order = DatasetOrder([10, 7, 9], seed=0)
    dealing = Dealing(order, slots=4, num_epochs=1, in_flight=2)
    assert not dealing.whole_shards and dealing.units_per_epoch == 8
    cover = [p for i in range(8) for p in range(*dealing.unit_range(0, i))]
    assert cover == list(range(26))  # the slices tile the epoch
    counts = [len(dealing.remaining(s, 0, {})[1]) for s in range(4)]
    assert sum(counts) == 26 and max(counts) - min(counts) <= 2  # each slot: two slices of 3 or 4


@pytest.mark.parametrize("sizes,slots,in_flight", [([10, 10], 16, 4), ([3, 3], 8, 4), ([20] * 4, 16, 4),
                                                   ([1], 3, 1), ([5, 1, 9], 4, 4)])
def test_no_slot_starves_when_shards_are_few_and_small(sizes, slots, in_flight):
    """Every slot's share of 4 epochs differs from the others' by at most 2F slices (none is empty)."""
    order = DatasetOrder(sizes, seed=2)
    dealing = Dealing(order, slots, num_epochs=4, in_flight=in_flight)
    counts = [len(pull(dealing, s, (0, 0), {}, 10 ** 6)[0]) for s in range(slots)]
    assert sum(counts) == 4 * sum(sizes)
    slice_size = -(-sum(sizes) // dealing.units_per_epoch)
    assert min(counts) > 0 and max(counts) - min(counts) <= 2 * in_flight * slice_size, counts


@pytest.mark.parametrize("sizes,slots,new_slots,in_flight,new_in_flight", [
    ([7, 5, 6, 4, 8], 2, 3, 1, 1), ([7, 5], 4, 1, 1, 1), ([3] * 9, 4, 2, 1, 1),
    ([7, 5, 6, 4, 8], 2, 3, 4, 4), ([7, 5], 4, 1, 4, 2), ([3] * 9, 4, 2, 2, 3), ([30] * 20, 2, 2, 4, 1)])
def test_folding_then_redealing_yields_exactly_the_unseen(sizes, slots, new_slots, in_flight, new_in_flight):
    rng = random.Random(0)
    order = DatasetOrder(sizes, seed=3)
    n = order.num_samples
    dealing = Dealing(order, slots, num_epochs=1, in_flight=in_flight)
    cursors, pulled, held = {}, [], []
    for s in range(slots):  # each slot pulls a different amount, holding a few back (its packing buffer)
        got, cursors[s] = pull(dealing, s, (0, 0), {}, rng.randrange(0, n // slots + 1))
        pulled += got
        held += got[-2:]
    consumed = set(pulled) - set(held)
    base = dealing.fold_cursors({}, cursors, held)
    assert {(0, p) for p in range(n) if p in base.get(0, Intervals())} == consumed
    new = Dealing(order, new_slots, num_epochs=1, in_flight=new_in_flight)
    after = []
    for s in range(new_slots):
        got, _ = pull(new, s, (0, 0), base, n + 1)
        after += got
    assert len(after) == len(set(after))
    assert set(after) == {(0, p) for p in range(n)} - consumed


def test_every_slot_pulls_each_position_of_an_epoch_once_across_epochs():
    order = DatasetOrder([5, 6, 7], seed=1)
    dealing = Dealing(order, slots=3, num_epochs=2, in_flight=2)
    got = [x for s in range(3) for x in pull(dealing, s, (0, 0), {}, 10 ** 6)[0]]
    assert sorted(got) == [(e, p) for e in range(2) for p in range(18)]


def test_the_samples_of_a_shard_come_in_a_seeded_permutation():
    """Inside a shard the order is a permutation of the stored samples that depends on seed and epoch
    (shuffle: false keeps the stored order)."""
    def inside(seed, e, shuffle=True):
        order = DatasetOrder([50, 60, 70], seed, shuffle)
        perm, starts = order.epoch(e)
        located = [order.locate(e, p) for p in range(starts[0], starts[1])]
        assert {s for s, _ in located} == {int(perm[0])}
        return int(perm[0]), [i for _, i in located]

    shard, first = inside(0, 0)
    assert sorted(first) == list(range(len(first))) and first != sorted(first)
    assert inside(1, 0)[1] != first or inside(1, 0)[0] != shard
    assert all(inside(0, e) != (shard, first) for e in (1, 2, 3))
    assert inside(0, 0, shuffle=False)[1] == list(range(50))
