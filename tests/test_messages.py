"""How errors and warnings name lists: one spelling everywhere ("a, b and N more")."""

from pathlib import Path

import pytest

from softvq.cli.common import refuse_to_overwrite
from softvq.messages import first_few, ignored_flags


def test_first_few_cuts_after_the_limit_and_counts_the_rest():
    names = [f"n{i}" for i in range(11)]
    assert first_few(names) == "n0, n1, n2, n3, n4, n5, n6, n7 and 3 more"
    assert first_few(names, 3, "; ") == "n0; n1; n2 and 8 more"
    assert first_few(names[:8]) == ", ".join(names[:8])  # exactly the limit: nothing left to count
    assert first_few(names[:2], 1) == "n0 and 1 more"
    assert first_few([]) == ""
    assert first_few([Path("a.png"), 3], 5) == "a.png, 3"
    with pytest.raises(ValueError, match="limit must be 1 or more"):
        first_few(names, 0)


def test_refusing_to_overwrite_names_the_first_file_and_counts_the_others(tmp_path):
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png", "free.png")]
    for path in paths[:3]:
        path.write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"a\.png and 2 more already exist; choose another --out$"):
        refuse_to_overwrite(paths, "choose another --out")
    with pytest.raises(FileExistsError, match=r"c\.png already exists; pass --force$"):
        refuse_to_overwrite(paths[2:], "pass --force")
    refuse_to_overwrite(paths[3:], "unused")  # nothing there: no error


def test_flags_given_where_they_would_be_ignored_are_refused_in_one_grammar():
    assert str(ignored_flags(["--a"], "MAR generators", reason="g is a SiT one")) == \
        "--a applies only to MAR generators; g is a SiT one: drop it"
    assert str(ignored_flags(["--a", "--b"], "--probe-generator GEN", instead="pass it")) == \
        "--a, --b apply only to --probe-generator GEN: pass it, or drop them"
