"""What a rerun is told when its settings differ from the saved work's."""

from softvq.resume import changed_settings


def test_changes_are_named_in_order_with_long_lists_summarised():
    saved = {"seed": 3, "interval": [0.0, 0.7], "labels": list(range(20)), "finished": False, "gone": 1}
    current = {"seed": 4, "interval": (0.0, 0.7), "labels": list(range(21)), "finished": True, "new": "x"}
    assert changed_settings(saved, current, ignore=["finished"]) == [
        "seed 3 -> 4", "labels differ (20 -> 21 items)", "gone 1 -> None", "new None -> 'x'"]
    # a tuple equals the list JSON stored it as; short lists are shown whole
    assert changed_settings({"a": [1, 2]}, {"a": (1, 2)}) == []
    assert changed_settings({"a": [1, 2]}, {"a": [2, 1]}) == ["a [1, 2] -> [2, 1]"]
