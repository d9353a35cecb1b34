"""bench quality end to end at toy size: rows cached, every configuration reported."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

import pytest

from conftest import events_frame
from ptls_meles.bench.quality import READOUTS, chosen_on_cv, main, parse_define, parse_vary, store_fingerprint
from ptls_meles.bench.report import markdown_table
from ptls_meles.downstream.evaluate import BLEND_WEIGHTS
from ptls_meles.prepare import prepare
from ptls_meles.schema import EventSchema


def test_parse_define_reads_json_values_and_plain_strings():
    assert parse_define("wide:hidden_size=512;pooling=last,mean;grad_clip=None") == (
        "wide", {"hidden_size": 512, "pooling": "last,mean", "grad_clip": None})


def test_parse_vary_makes_one_configuration_per_value():
    assert parse_vary("encoder=gru/lstm") == {"encoder=gru": {"encoder": "gru"}, "encoder=lstm": {"encoder": "lstm"}}
    assert parse_vary("hidden_size=32/64")["hidden_size=64"] == {"hidden_size": 64}
    with pytest.raises(ValueError, match="KEY=VALUE/VALUE"):
        parse_vary("encoder")


@pytest.mark.parametrize("freeze", ["-1", "50"])
def test_a_freeze_that_never_lets_the_encoder_train_is_refused_before_any_work(tmp_path, freeze):
    with pytest.raises(ValueError, match="--finetune-freeze must be >= 0 and below --finetune-epochs"):
        main(["--dataset", str(tmp_path / "no_store"), "--out", str(tmp_path / "work"), "--neural",
              "--finetune-freeze", freeze])
    assert not (tmp_path / "work").exists()


def test_markdown_table_escapes_pipes():
    assert markdown_table(["a", "b"], [[1, "x|y"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | x\\|y |"]


def toy_store_with_labels(store_dir, n_clients: int, seed: int):
    """A prepared toy store with a random binary ``label`` in its targets.parquet (drawn from
    its own stream: the events' generator with the same seed would tie it to the lengths)."""
    events = events_frame(n_clients=n_clients, max_len=30, seed=seed)
    store, _ = prepare(events, EventSchema("client", "day", ["mcc"], ["amount"], time_format="number"), out=store_dir,
                       show_progress=False)
    rng = np.random.default_rng([seed, 1])
    pd.DataFrame({"client_id": store.client_ids, "label": rng.integers(0, 2, store.n_clients)}).to_parquet(
        store_dir / "targets.parquet")
    return store


def test_train_only_trains_without_scoring_and_a_later_run_scores_that_training(tmp_path):
    store_dir = tmp_path / "store"
    toy_store_with_labels(store_dir, n_clients=120, seed=5)
    argv = ["--dataset", str(store_dir), "--out", str(tmp_path / "work"), "--configs", "", "--define",
            "tiny:hidden_size=8;batch_size=16;cnt_min=2;cnt_max=10;num_workers=0", "--epochs", "1", "--lgbm", "fast"]
    with pytest.raises(SystemExit):  # argparse refuses the pair: each would stop before the other's work
        main(argv + ["--train-only", "--report-only"])
    main(argv + ["--train-only"])
    assert not list((tmp_path / "work" / "rows").glob("*.json"))  # nothing scored, not even hand-crafted
    # scored elsewhere: the store and OUT both move (trained on one machine, scored on another)
    (tmp_path / "here").mkdir()
    store_dir = store_dir.rename(tmp_path / "here" / "store")
    work = (tmp_path / "work").rename(tmp_path / "here" / "work")
    argv[1], argv[3] = str(store_dir), str(work)
    ckpt = next((work / "runs").glob("tiny-*/checkpoints/best.ckpt"))
    ckpt_time = ckpt.stat().st_mtime
    main(argv + ["--report", str(tmp_path / "q")])
    assert ckpt.stat().st_mtime == ckpt_time and len(list((work / "runs").iterdir())) == 1
    row = next(r for r in json.loads((tmp_path / "q.json").read_text()) if r["name"] == "tiny")
    assert row["epochs"] == 1 and 0.0 <= row["scores"]["label"]["test"] <= 1.0


def test_the_store_fingerprint_follows_the_data_not_its_path(tmp_path):
    store = toy_store_with_labels(tmp_path / "a", n_clients=40, seed=3)
    targets = pd.read_parquet(tmp_path / "a" / "targets.parquet")
    same = toy_store_with_labels(tmp_path / "b", n_clients=40, seed=3)
    assert store_fingerprint(store, targets) == store_fingerprint(same, targets)
    relabelled = targets.assign(label=1 - targets["label"])
    assert store_fingerprint(store, relabelled) != store_fingerprint(store, targets)
    other = toy_store_with_labels(tmp_path / "c", n_clients=40, seed=4)
    assert store_fingerprint(other, targets) != store_fingerprint(store, targets)
    name = store.numeric[0]
    store.columns[name] = store.columns[name].copy()
    store.columns[name][0] += 1.0  # one event value differs: the cached rows must not be reused
    assert store_fingerprint(store, targets) != store_fingerprint(same, targets)


def test_cached_runs_are_keyed_by_the_resolved_settings_so_a_defaults_change_retrains(tmp_path, monkeypatch):
    from dataclasses import dataclass
    from types import SimpleNamespace

    from ptls_meles.bench import quality
    from ptls_meles.config import MeLESConfig

    a = SimpleNamespace(budget_min=30.0, epochs=100)
    today = quality._run_dir("defaults", {}, tmp_path, a, {"data": 1})
    # spelling a default out is the same training; an inference-only setting shares the run
    assert quality._run_dir("defaults", {"hidden_size": MeLESConfig().hidden_size}, tmp_path, a, {"data": 1}) == today
    assert quality._run_dir("defaults", {"embed_chunk": 100}, tmp_path, a, {"data": 1}) == today
    assert quality._run_dir("defaults", {"hidden_size": 7}, tmp_path, a, {"data": 1}) != today
    # a setting added later keeps the runs cached before it at its off value, not at another
    added = next(iter(quality.ADDED_SETTINGS_OFF))
    assert added not in quality.resolved_settings({})
    assert quality._run_dir("defaults", {added: 64}, tmp_path, a, {"data": 1}) != today

    # the LightGBM read-out is not training: another budget scores the same run, also one cached
    # under the older key that held the read-out
    fast = quality._run_dir("defaults", {}, tmp_path, a, {"data": 1, "lgbm": "fast"})
    assert quality._run_dir("defaults", {}, tmp_path, a, {"data": 1, "lgbm": "paper"}) == fast
    old = quality._digest({"data": {"data": 1, "lgbm": "fast"}, "config": quality.resolved_settings({}, training_only=True),
                           "budget": a.budget_min, "epochs": a.epochs})
    (tmp_path / "runs" / f"defaults-{old}").mkdir(parents=True)
    assert quality._run_dir("defaults", {}, tmp_path, a, {"data": 1, "lgbm": "paper"}) == fast  # unfinished: not reused
    (tmp_path / "runs" / f"defaults-{old}" / "train_minutes.txt").write_text("30")
    assert quality._run_dir("defaults", {}, tmp_path, a, {"data": 1, "lgbm": "paper"}).name == f"defaults-{old}"

    @dataclass
    class NewDefaults(MeLESConfig):
        hidden_size: int = 7

    monkeypatch.setattr(quality, "MeLESConfig", NewDefaults)  # the library's defaults change
    assert quality._run_dir("defaults", {}, tmp_path, a, {"data": 1}) != today


def test_quality_bench_caches_rows_and_reports_every_configuration(tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    toy_store_with_labels(store_dir, n_clients=150, seed=4)
    argv = ["--dataset", str(store_dir), "--out", str(tmp_path / "work"), "--configs", "paper",
            "--define", "pooled:pooling=last,max;numeric_encoding=by_category", "--set", "hidden_size=8",
            "--set", "batch_size=16", "--set", "cnt_min=2", "--set", "cnt_max=10", "--set", "num_workers=0",
            "--epochs", "1", "--budget-min", "5", "--lgbm", "fast", "--report", str(tmp_path / "report" / "q")]
    main(argv)
    rows = json.loads((tmp_path / "report" / "q.json").read_text())
    assert [r["name"] for r in rows] == ["hand-crafted", "paper", "pooled"]
    assert rows[2]["config"]["pooling"] == "last,max" and rows[2]["epochs"] == 1
    for r in rows[1:]:
        assert 0.0 <= r["scores"]["label"]["test"] <= 1.0 and "label" in r["scores_both"]
    text = (tmp_path / "report" / "q.md").read_text()
    assert "| pooled | hand-crafted + embeddings |" in text and (tmp_path / "report" / "q.png").stat().st_size > 0
    # a rerun trains nothing: the cached rows are reused as they are
    stamp = {p.name: p.stat().st_mtime for p in (tmp_path / "work" / "rows").glob("*.json")}
    main(argv[:-2] + ["--report-only", "--report", str(tmp_path / "report" / "again")])
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "work" / "rows").glob("*.json")} == stamp
    assert json.loads((tmp_path / "report" / "again.json").read_text()) == rows
    # a cleaned work directory: an earlier report's rows come back with --include-rows, the cache's win
    earlier = tmp_path / "earlier.json"
    gone = {k: v for k, v in rows[2].items() if k != "scores_both"}  # its scoring stopped after the embeddings alone
    earlier.write_text(json.dumps(rows[:2] + [dict(gone, name="gone"), dict(rows[1], scores={})]))
    paper_row = next((tmp_path / "work" / "rows").glob("paper-*.json"))
    paper_row.rename(tmp_path / "moved.json")
    main(argv[:-2] + ["--report-only", "--include-rows", str(earlier), "--report", str(tmp_path / "report" / "merged")])
    merged = {r["name"]: r for r in json.loads((tmp_path / "report" / "merged.json").read_text())}
    assert sorted(merged) == ["gone", "hand-crafted", "paper", "pooled"]
    assert merged["paper"] == rows[1]  # from the earlier report (the cache lost it); its empty-scored twin is dropped
    merged_text = (tmp_path / "report" / "merged.md").read_text()
    assert "| gone | embeddings |" in merged_text and "| gone | hand-crafted + embeddings |" not in merged_text
    (tmp_path / "moved.json").rename(paper_row)
    (tmp_path / "not_rows.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not_rows.json: not a report's rows"):
        main(argv[:-2] + ["--report-only", "--include-rows", str(tmp_path / "not_rows.json"), "--report", str(tmp_path / "r")])
    # an inference-only variant (NAME@...) embeds with the trained run of NAME: no new training
    runs_before = sorted(p.name for p in (tmp_path / "work" / "runs").iterdir())
    ckpt = next((tmp_path / "work" / "runs").glob("pooled-*/checkpoints/best.ckpt"))
    ckpt_time = ckpt.stat().st_mtime
    main(argv[:-2] + ["--configs", "", "--define", "pooled@chunk4:pooling=last,max;numeric_encoding=by_category;embed_chunk=4",
                      "--report", str(tmp_path / "report" / "chunk")])
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == runs_before and ckpt.stat().st_mtime == ckpt_time
    chunk_rows = json.loads((tmp_path / "report" / "chunk.json").read_text())
    variant = next(r for r in chunk_rows if r["name"] == "pooled@chunk4")
    assert variant["config"]["embed_chunk"] == 4 and variant["epochs"] == rows[2]["epochs"]
    assert variant["scores"] != rows[2]["scores"]  # other embeddings, scored again
    # --neural: the supervised row (once per data) and the configuration fine-tuned from its own
    # trained run (no new training), each fold stopping on its validation score
    main(argv[:-2] + ["--configs", "paper", "--neural", "--finetune-epochs", "2", "--finetune-patience", "1",
                      "--report", str(tmp_path / "report" / "neural")])
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == runs_before
    neural = json.loads((tmp_path / "report" / "neural.json").read_text())
    assert [r["name"] for r in neural] == ["hand-crafted", "supervised encoder", "paper", "pooled"]
    for scores in (neural[1]["scores"], neural[2]["scores_finetuned"], neural[3]["scores_finetuned"]):
        assert 0.0 <= scores["label"]["test"] <= 1.0 and all(1 <= e <= 2 for e in scores["label"]["best_epochs"])
    assert neural[2]["scores"] == rows[1]["scores"]  # the embedding rows are the cached ones
    text = (tmp_path / "report" / "neural.md").read_text()
    assert "| supervised encoder | sequences |" in text and "| paper | fine-tuned |" in text
    # --finetune-freeze: each configuration is fine-tuned again, the encoder frozen at first; the
    # supervised row (nothing pretrained to freeze) is kept as it was
    from ptls_meles.downstream import finetune

    calls, real = [], finetune.supervised_eval
    monkeypatch.setattr(finetune, "supervised_eval",
                        lambda *a, **kw: calls.append((kw["pretrained"] is not None, kw["freeze_epochs"])) or real(*a, **kw))
    main(argv[:-2] + ["--configs", "paper", "--neural", "--finetune-epochs", "2", "--finetune-patience", "1",
                      "--finetune-freeze", "1", "--report", str(tmp_path / "report" / "frozen")])
    assert calls == [(True, 1), (True, 1)]
    frozen = json.loads((tmp_path / "report" / "frozen.json").read_text())
    assert frozen[1]["scores"] == neural[1]["scores"] and frozen[2]["finetune"]["finetune_freeze"] == 1
    assert "label" in frozen[2]["scores_finetuned"] and "label" in frozen[3]["scores_finetuned"]
    # --vary: one configuration per value; --fractions: fewer labelled clients, the test part fixed
    base = argv[:argv.index("--configs")] + argv[argv.index("--set"):-2]
    main(base + ["--configs", "", "--vary", "hidden_size=8/12", "--fractions", "0.5",
                 "--report", str(tmp_path / "report" / "vary")])
    vary = json.loads((tmp_path / "report" / "vary.json").read_text())
    assert [r["name"] for r in vary] == ["hand-crafted", "hidden_size=8", "hidden_size=12"]
    assert vary[1]["config"]["hidden_size"] == 8 and vary[2]["config"]["hidden_size"] == 12
    for r in vary:
        assert list(r["fractions"]) == ["0.5"] and 0.0 <= r["fractions"]["0.5"]["label"]["test"] <= 1.0
    assert vary[0]["scores"] == rows[0]["scores"]  # the hand-crafted row is cached; only its fraction is new
    text = (tmp_path / "report" / "vary.md").read_text()
    assert "| 0.5 | hidden_size=12 |" in text and (tmp_path / "report" / "vary_fractions.png").stat().st_size > 0
    # --hand-shares on a trained row: embeddings beside the stronger yardstick, from the cached run
    runs_before = sorted(p.name for p in (tmp_path / "work" / "runs").iterdir())
    main(argv[:-2] + ["--configs", "paper", "--hand-shares", "--report", str(tmp_path / "report" / "shares")])
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == runs_before
    shares = json.loads((tmp_path / "report" / "shares.json").read_text())
    assert [r["name"] for r in shares[:2]] == ["hand-crafted", "hand-crafted + shares of every value"]
    paper = next(r for r in shares if r["name"] == "paper")
    assert paper["scores"] == rows[1]["scores"] and paper["scores_both"] == rows[1]["scores_both"]
    assert 0.0 <= paper["scores_both_shares"]["label"]["test"] <= 1.0
    assert paper["scores_both_shares"] != paper["scores_both"]  # other features beside the embeddings
    assert "| paper | hand-crafted + shares + embeddings |" in (tmp_path / "report" / "shares.md").read_text()
    # --linear-probe: every feature table also read by a linear probe, from the cached run
    main(argv[:-2] + ["--configs", "paper", "--hand-shares", "--linear-probe", "--report", str(tmp_path / "report" / "lin")])
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == runs_before
    lin = {r["name"]: r for r in json.loads((tmp_path / "report" / "lin.json").read_text())}
    assert lin["paper"]["scores"] == rows[1]["scores"] and lin["hand-crafted"]["scores"] == rows[0]["scores"]
    for name in ("hand-crafted", "hand-crafted + shares of every value", "paper"):
        probe = lin[name]["scores_linear"]["label"]
        assert 0.0 <= probe["test"] <= 1.0 and probe != lin[name]["scores"]["label"]
    text = (tmp_path / "report" / "lin.md").read_text()
    assert "| paper | embeddings, linear probe |" in text and "| hand-crafted | linear probe |" in text
    stacked = lin["paper"]["scores_stacked"]["label"]
    assert 0.0 <= stacked["test"] <= 1.0 and stacked != lin["paper"]["scores_both_shares"]["label"]
    assert "| paper | hand-crafted + shares, stacked with the embeddings' probe |" in text
    blended = lin["paper"]["scores_blended"]["label"]  # the probe's share picked on each validation fold, kept
    assert 0.0 <= blended["test"] <= 1.0 and blended != stacked
    assert len(blended["blend_weights"]) == 5 and set(blended["blend_weights"]) <= set(BLEND_WEIGHTS)
    assert "| paper | hand-crafted + shares, blended with the embeddings' probe |" in text
    # a row scored with another strength grid is scored again, the others are reused
    paper_file = next((tmp_path / "work" / "rows").glob("paper-*.json"))
    stale = json.loads(paper_file.read_text())
    paper_file.write_text(json.dumps(dict(stale, linear_Cs=[1.0], scores_linear={"label": {"test": -1.0}},
                                          scores_stacked={"label": {"test": -1.0}}, scores_blended={"label": {"test": -1.0}})))
    main(argv[:-2] + ["--configs", "paper", "--hand-shares", "--linear-probe", "--report", str(tmp_path / "report" / "lin2")])
    lin2 = {r["name"]: r for r in json.loads((tmp_path / "report" / "lin2.json").read_text())}
    assert lin2["paper"]["scores_linear"] == lin["paper"]["scores_linear"] and lin2["hand-crafted"] == lin["hand-crafted"]
    assert lin2["paper"]["scores_stacked"] == lin["paper"]["scores_stacked"]
    assert lin2["paper"]["scores_blended"] == lin["paper"]["scores_blended"]
    # the summary credits each table with the read-out its CV prefers
    summary = text.split("The test part never chooses.")[1].split("Configurations")[0]
    for readouts, key in ((READOUTS["alone"], "scores"), (READOUTS["with hand-crafted + shares"], "scores_both_shares")):
        label, s = chosen_on_cv(lin["paper"], readouts, ["label"])["label"]
        other = next(k for k, _ in readouts if k != key)
        assert s["cv"] == max(lin["paper"][key]["label"]["cv"], lin["paper"][other]["label"]["cv"])
        assert f"{s['test']:.3f} ± {s['test_interval']:.3f} ({label})" in summary
    assert "| hand-crafted + shares of every value | aggregates |" in summary


def test_chosen_on_cv_picks_by_the_cv_mean_never_the_test_part():
    def score(cv, test):
        return {"cv": cv, "test": test, "test_interval": 0.01, "metric": "auroc"}

    row = {"scores": {"a": score(0.70, 0.90), "b": score(0.80, 0.80)},
           "scores_linear": {"a": score(0.75, 0.60), "b": score(0.80, 0.99)}}
    chosen = chosen_on_cv(row, READOUTS["alone"], ["a", "b"])
    assert chosen["a"] == ("linear probe", row["scores_linear"]["a"])  # higher CV, lower test
    assert chosen["b"] == ("LightGBM", row["scores"]["b"])  # a tie keeps the first read-out
    assert chosen_on_cv({"scores": row["scores"]}, READOUTS["alone"], ["a"]) == {}  # nothing to choose


def test_an_earlier_supervised_row_under_a_dated_name_stays_a_supervised_row(tmp_path):
    from ptls_meles.bench.quality import cached_rows

    score = {"label": {"test": 0.5, "test_interval": 0.1, "cv": 0.5, "cv_interval": 0.1, "metric": "auroc", "best_epochs": [3]}}
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    (rows_dir / "_handcrafted-x.json").write_text(json.dumps({"name": "hand-crafted", "n_features": 3, "scores": score}))
    (rows_dir / "_supervised-x.json").write_text(json.dumps({"name": "supervised encoder", "scores": score}))
    (rows_dir / "default-x.json").write_text(json.dumps({"name": "default", "scores": score, "budget_min": 0}))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps([{"name": "supervised encoder (GRU, 2026-11-28)", "scores": score}]))
    names = [r["name"] for r in cached_rows(rows_dir, ["label"], [str(earlier)])]
    assert names == ["hand-crafted", "supervised encoder", "supervised encoder (GRU, 2026-11-28)", "default"]


def test_hand_shares_adds_a_second_yardstick_row_kept_apart_from_the_both_rows(tmp_path):
    """--hand-shares scores hand-crafted + every value's share as its own row (reported and
    cached after the plain one); the plain hand-crafted row is unchanged."""
    store_dir = tmp_path / "store"
    store = toy_store_with_labels(store_dir, n_clients=120, seed=5)
    argv = ["--dataset", str(store_dir), "--out", str(tmp_path / "work"), "--configs", "", "--lgbm", "fast",
            "--report", str(tmp_path / "report" / "q")]
    main(argv)
    plain = json.loads((tmp_path / "report" / "q.json").read_text())
    assert [r["name"] for r in plain] == ["hand-crafted"]
    main(argv + ["--hand-shares"])
    rows = json.loads((tmp_path / "report" / "q.json").read_text())
    assert [r["name"] for r in rows] == ["hand-crafted", "hand-crafted + shares of every value", "shares of every value"]
    n_values = len(store.encoding.categorical["mcc"].values)
    assert rows[1]["n_features"] == rows[0]["n_features"] + n_values + 1  # + the rare id's share
    assert rows[2]["n_features"] == n_values + 1  # the shares alone
    assert rows[0]["scores"] == plain[0]["scores"]
    assert 0.0 <= rows[1]["scores"]["label"]["test"] <= 1.0
    assert rows[2]["scores"] != rows[1]["scores"]
    report = (tmp_path / "report" / "q.md").read_text()
    assert "| hand-crafted + shares of every value |" in report and f"| shares of every value | {n_values + 1} aggregates |" in report
    main(argv[:-2] + ["--report-only", "--report", str(tmp_path / "report" / "again")])
    again = json.loads((tmp_path / "report" / "again.json").read_text())
    assert [r["name"] for r in again] == [r["name"] for r in rows]
