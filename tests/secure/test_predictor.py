"""Predictors for weight streaming (cyclic), KV swapping (FIFO) and adapter schedules."""
from ccserve.secure.predictor import (
    Cycle,
    CyclicPredictor,
    FifoPredictor,
    Forget,
    Predictor,
    Schedule,
    SchedulePredictor,
    SwapOut,
)


def test_cyclic_learns_the_period_after_two_rounds():
    p = CyclicPredictor()
    for k in "abcd":
        p.observe(k)
    assert p.predict(2) == []
    for k in "abcd":
        p.observe(k)
    assert p.predict(3) == ["a", "b", "c"]
    p.observe("a")
    assert p.predict(5) == ["b", "c", "d", "a"]  # never more than one period


def test_cyclic_hint_and_resync():
    p = CyclicPredictor()
    p.hint(Cycle(("l0", "l1", "l2")))
    assert p.predict(2) == ["l0", "l1"]
    p.observe("l2")  # out of turn: re-synchronize to its place
    assert p.predict(2) == ["l0", "l1"]
    p.observe("l0")
    assert p.predict(1) == ["l1"]


def test_cyclic_relearns_when_pattern_changes():
    p = CyclicPredictor()
    for k in "abab":
        p.observe(k)
    assert p.predict(2) == ["a", "b"]
    for k in "xyzxyz":
        p.observe(k)
    assert p.predict(3) == ["x", "y", "z"]


def test_fifo_follows_swap_out_order():
    p = FifoPredictor()
    for k in (1, 2, 3):
        p.hint(SwapOut(k))
    assert p.predict(2) == [1, 2]
    p.observe(2)  # swapped in out of order
    assert p.predict(3) == [1, 3]
    p.hint(Forget(1))
    p.hint(SwapOut(3))  # swapped out again: moves to the back
    p.hint(SwapOut(4))
    assert p.predict(3) == [3, 4]


def test_schedule_is_consumed_in_order():
    p = SchedulePredictor()
    p.hint(Schedule(("A", "B", "A", "C")))
    assert p.predict(2) == ["A", "B"]
    p.observe("B")  # skips the first A
    assert p.predict(5) == ["A", "C"]
    p.hint(Forget("C"))
    assert p.predict(5) == ["A"]
    p.observe("Z")  # unscheduled: no change
    assert p.predict(1) == ["A"]


def test_base_predictor_predicts_nothing():
    p = Predictor()
    p.observe("x")
    p.hint(Cycle(("x",)))
    assert p.predict(4) == []
