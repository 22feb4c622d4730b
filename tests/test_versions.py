"""versions.py, the registry's command line: rollback to an earlier version in one command,
export and list; a candidate run in shadow and stopped; an unknown or ambiguous version changes
nothing.
"""

from __future__ import annotations

from registry_fixtures import SHIPPED, honest_sets, promotions, sha, write
from test_app import save_untrained_model

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


def shadows(server) -> list[str | None]:
    with server.connect() as conn:
        return [row[0] for row in conn.execute("SELECT sha256 FROM model_shadow ORDER BY id")]


def test_shadow_sets_a_candidate_beside_the_live_model_and_off_stops_it(
    server, live_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DATABASE_URL", server.url)
    candidate = save_untrained_model(tmp_path / "candidate.pth").read_bytes()
    with server.connect() as conn:
        live = store.ensure_live(conn, live_file)
        store.register(conn, candidate, {})

    assert versions.main(["shadow", sha(candidate)[:6]]) == 0
    assert versions.main(["shadow", sha(candidate)[:8]]) == 0  # already: nothing recorded
    assert shadows(server) == [sha(candidate)]
    assert f"{sha(candidate)[:12]} is in shadow" in capsys.readouterr().out
    assert versions.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert f"s {sha(candidate)[:12]}" in listing and f"* {live[:12]}" in listing
    assert listing.count("in shadow now") == 1

    assert versions.main(["shadow", "off"]) == 0
    assert shadows(server) == [sha(candidate), None]
    assert versions.main(["list"]) == 0
    assert "in shadow now" not in capsys.readouterr().out
    assert promotions(server) == [("initial", live)]  # the live model never changed


def test_shadow_refuses_the_live_version_and_an_unknown_one(server, live_file, monkeypatch, caplog):
    monkeypatch.setenv("DATABASE_URL", server.url)
    with server.connect() as conn:
        live = store.ensure_live(conn, live_file)
    assert versions.main(["shadow", live[:8]]) == 2
    assert f"{live[:12]} is the live version: a shadow runs beside the live model" in caplog.text
    assert versions.main(["shadow", "0000000"]) == 2
    assert "no version's hash starts with 0000000" in caplog.text
    assert shadows(server) == []


def test_promote_judges_a_registered_version_again_with_its_shadow_answers(
    server, live_file, monkeypatch, tmp_path
):
    """`versions.py promote PREFIX`: a version that reads the evaluation sets as the live model
    does is refused for want of evidence; once its answers in shadow show it better, the same
    command makes it live (MNIST and the pen digits: the committed subsets)."""
    from mnist_files import SUBSET
    from test_registry_promotion import same_answers_other_version, store_shadow_answers

    monkeypatch.setenv("DATABASE_URL", server.url)
    monkeypatch.setenv("MNIST_DIR", str(SUBSET))
    candidate = same_answers_other_version()
    with server.connect() as conn:
        live = store.ensure_live(conn, live_file)
        store.register(conn, candidate, {"about": "a candidate"})
    prefix = sha(candidate)[:10]

    assert versions.main(["promote", prefix, "--out", str(live_file)]) == promotion.EXIT_REFUSED
    with server.connect() as conn:
        assert store.live_sha(conn) == live

    store_shadow_answers(server, live, sha(candidate), [(1, 7, 7), (2, 3, 3), (4, 4, 4)])
    report = tmp_path / "report.json"
    assert versions.main(["promote", prefix, "--out", str(live_file), "--report", str(report)]) == 0
    with server.connect() as conn:
        assert store.live_sha(conn) == sha(candidate)
    assert live_file.read_bytes() == candidate
    assert '"promoted": true' in report.read_text()
