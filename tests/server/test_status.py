"""The status page's state, read from a run's record (the page itself is tested in a browser:
tests/integration/test_status_page.py)."""


def test_the_state_shows_each_sites_epsilon_against_the_budget(tmp_path):
    import json

    from server.results import BUDGET
    from server.status import run_state

    rows = [
        {"phase": "finetune", "round": 1, "kind": "train", "site": "site0", "status": "ok", "epsilon": 2.5},
        {"phase": "finetune", "round": 1, "kind": "train", "site": "ALL", "status": "ok", "seconds": 4.0},
    ]
    info = {BUDGET: 8.0, "pretrain rounds": 0, "finetune rounds": 3}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "rounds.json").write_text(
        json.dumps({"kind": "results", "version": 1, "info": info, "rows": rows})
    )
    state = run_state(tmp_path)
    assert state["epsilon_budget"] == 8.0 and state["sites"][0]["epsilon"] == 2.5
    assert state["seconds_left"] == 8.0 and state["outcome"] == "in progress"  # 2 rounds left at 4 s
