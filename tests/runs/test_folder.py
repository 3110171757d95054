"""Run folders: a new run never shares a folder or fails because another run starts beside it."""

import threading

from conjure.runs.folder import create_run_dir


def test_runs_starting_at_the_same_instant_get_their_own_folders(tmp_path):
    # Issue 21, D15: both used the probe file .conjure-write-test, so one run removed the other's probe and
    # failed "output folder ... is not writable: No such file or directory"; nothing stopped both from
    # picking the same empty folder either.
    runs, rounds = 8, 40
    for round_ in range(rounds):
        barrier, made, errors = threading.Barrier(runs), [], []

        def start(name=f"same-{round_}"):
            barrier.wait()
            try:
                made.append(create_run_dir(str(tmp_path), name))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(runs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert len(set(made)) == runs
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no probe file left behind


def test_an_empty_folder_is_used_and_a_used_one_is_not(tmp_path):
    (tmp_path / "mine").mkdir()
    assert create_run_dir(str(tmp_path), "mine") == tmp_path / "mine"
    assert create_run_dir(str(tmp_path), "mine") == tmp_path / "mine_2"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["checkpoints", "logs", "validation"]


def test_a_run_config_that_is_an_alias_bomb_is_not_expanded(tmp_path):
    # A run folder may come from someone else ("please continue this"): its config.yaml is read with the config
    # loader's rules, so an alias bomb is refused instead of being walked key by key (about 9**7 keys here; the
    # review's web probe, issue 21 D7, expanded 9**9 to 1.85 GB).
    import time

    import yaml

    from conjure.config import parse_config, starter_yaml
    from conjure.runs.folder import resume_changes

    lines = ["a0: &a0 {" + ", ".join(f"k{i}: x" for i in range(9)) + "}"]
    for level in range(1, 7):
        refs = ", ".join(f"k{i}: *a{level - 1}" for i in range(9))
        lines.append(f"a{level}: &a{level} {{{refs}}}")
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = parse_config(yaml.safe_load(starter_yaml("textual_inversion")))
    started = time.monotonic()
    assert resume_changes(tmp_path / "config.yaml", config) == {}
    assert time.monotonic() - started < 2
