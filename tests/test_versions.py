"""versions.py, the registry's command line: rollback to an earlier version in one command,
export and list; an unknown or ambiguous version changes nothing.
"""

from __future__ import annotations

from registry_fixtures import SHIPPED, honest_sets, promotions, sha, write

import versions
from registry import promotion, store


def test_rollback_to_an_earlier_version_takes_one_command(
    server, live_file, vandal_candidates, drill, monkeypatch, tmp_path, capsys
):
    vandal = vandal_candidates["sevens"][0]
    write(live_file, vandal)
    promotion.promote(SHIPPED, {}, honest_sets(drill), conninfo=server.url, out=live_file)
    monkeypatch.setenv("DATABASE_URL", server.url)

    assert versions.main(["rollback", sha(vandal)[:8], "--out", str(live_file)]) == 0

    shipped_sha = sha(SHIPPED.read_bytes())
    assert [action for action, _ in promotions(server)] == ["initial", "promote", "rollback"]
    assert promotions(server)[-1][1] == sha(vandal)
    assert live_file.read_bytes() == vandal
    # The live model's weights, exported; the list marks it live and shows both periods.
    exported = tmp_path / "exported.pth"
    assert versions.main(["export", str(exported)]) == 0
    assert exported.read_bytes() == vandal
    capsys.readouterr()
    assert versions.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert f"* {sha(vandal)[:12]}" in listing and f"  {shipped_sha[:12]}" in listing
    assert listing.count(" to now") == 1


def test_rollback_to_an_unknown_or_ambiguous_version_changes_nothing(
    server, live_file, monkeypatch, caplog
):
    monkeypatch.setenv("DATABASE_URL", server.url)
    with server.connect() as conn:
        store.ensure_live(conn, live_file)
    before = promotions(server), live_file.read_bytes()
    assert versions.main(["rollback", "0000000", "--out", str(live_file)]) == 2
    assert versions.main(["rollback", "zz", "--out", str(live_file)]) == 2
    assert (promotions(server), live_file.read_bytes()) == before
    assert "no version's hash starts with 0000000" in caplog.text
