"""The "no match" threshold (rule, storage in the gallery, likely flags in the library and the HTTP API) and
galleries that accept merged queries (asymmetric use, opt-in)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import requests
from serve_util import PATTERN, TINY, build_gallery, make_crops

from reid_lite.config import load_cfg
from reid_lite.index import FingerprintMismatch, Gallery
from reid_lite.index.calibration import (
    CALIBRATION_FORMAT,
    calibrate_gallery,
    calibration_entry,
    validate_calibration,
)
from reid_lite.index.cli import main as gallery_cli
from reid_lite.index.crops import collect_crops
from reid_lite.index.fingerprint import model_digest
from reid_lite.index.server import BackgroundServer, create_app
from reid_lite.metrics.calibration import ThresholdChoice, choose_threshold, held_out, top1_scores

T = 60


# ----------------------------------------------------------------------------- the rule, by hand


def test_f1_rule_on_a_hand_case():
    scores = np.array([0.6, 0.9, 0.5, 0.8, 0.7])  # sorted: 0.9 T, 0.8 T, 0.7 F, 0.6 T, 0.5 F
    correct = np.array([True, True, False, True, False])
    c = choose_threshold(scores, correct)
    # F1 flagging the top 1..5: 0.5, 0.8, 0.667, 0.857, 0.75 -> keep four, cut halfway between 0.6 and 0.5
    assert c.rule == "f1" and c.threshold == pytest.approx(0.55)
    assert (c.precision, c.recall, c.f1) == pytest.approx((0.75, 1.0, 6 / 7))
    assert (c.num_queries, c.num_true_top1, c.num_flagged) == (5, 3, 4)


def test_target_precision_rule_takes_the_most_recall_at_the_target():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, False])
    exact = choose_threshold(scores, correct, target_precision=1.0)
    assert exact.threshold == pytest.approx(0.75) and exact.recall == pytest.approx(2 / 3)
    looser = choose_threshold(scores, correct, target_precision=0.7)
    assert looser.threshold == pytest.approx(0.55) and looser.precision == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no threshold reaches precision 1: the best is 0.500"):
        choose_threshold(np.array([0.9, 0.8]), np.array([False, True]), target_precision=1.0)


def test_ties_are_never_split_and_flagging_everything_means_minus_one():
    c = choose_threshold(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]))
    assert c.threshold == -1.0 and c.num_flagged == 3 and c.precision == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no query's top hit is a true match"):
        choose_threshold(np.array([0.9, 0.4]), np.array([False, False]))


def test_top1_leaves_out_the_same_identity_from_the_same_camera():
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)  # pid 1 cam 0 (junk), pid 2, pid 1 cam 1
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    scores, correct, kept = top1_scores(q, g, np.array([1, 1]), np.array([1, 2, 1]), np.array([0, 0]),
                                        np.array([0, 1, 1]))
    assert scores == pytest.approx([0.8, 1.0]) and correct.tolist() == [False, True] and kept.all()
    only_junk = top1_scores(q[:1], g[:1], np.array([1]), np.array([1]), np.array([0]), np.array([0]))
    assert len(only_junk[0]) == 0 and only_junk[2].tolist() == [False]  # no candidate: dropped


def test_held_out_flags_each_identity_with_a_threshold_chosen_without_it():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, False])
    pids = np.array([1, 2, 3, 4])  # folds by sorted identity: {1, 3} and {2, 4}
    # fold {1, 3}: chosen on {2, 4}, which has no right top hit -> no estimate
    assert held_out(scores, correct, pids) is None
    pids = np.array([1, 1, 2, 2])  # folds {1} (0.9 right, 0.8 wrong) and {2} (0.7 right, 0.6 wrong)
    est = held_out(scores, correct, pids)
    # {1} is flagged with {2}'s threshold 0.65 (both flagged), {2} with {1}'s 0.85 (none flagged)
    assert est == {"precision": pytest.approx(0.5), "recall": pytest.approx(0.5), "folds": 2}
    assert held_out(scores, correct, np.ones(4)) is None  # one identity cannot be split


@pytest.mark.parametrize("record,words", [
    ({"format": "other", "entries": []}, "not a reid-calibration/1 record"),
    ({"format": CALIBRATION_FORMAT, "entries": [{"threshold": 1.5}]}, "threshold 1.5 is not a cosine"),
    ({"format": CALIBRATION_FORMAT, "entries": [{"threshold": 0.5, "gallery_model": "x"}]}, "gallery_model"),
    ({"format": CALIBRATION_FORMAT, "entries": [{"threshold": 0.5, "gallery_model": "a" * 64, "query_model": "b" * 64,
      "precision": 1, "recall": 1, "f1": 1, "num_queries": 1, "num_true_top1": 1, "num_flagged": 1, "rule": "f1",
      "held_out": {"precision": 2.0, "recall": 0.5}}]}, "held_out"),
])
def test_a_malformed_record_is_rejected(record, words):
    with pytest.raises(ValueError, match=words):
        validate_calibration(record)


# ----------------------------------------------------------------------------- a calibrated gallery


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    return make_crops(tmp_path_factory.mktemp("crops"))


def labelled_split(g: Gallery, crops: Path) -> tuple[tuple, tuple, int]:
    """A labelled split with a known answer: every stored crop queries with its own stored feature under
    another camera label (its top hit is itself, score 1: right), and the query folder's crops query
    under an identity the gallery lacks (their top hit is wrong)."""
    ids = g.store.all_ids()
    recs = g.store.get(ids.tolist())
    stored = g.crop_features(ids.tolist())
    pids = np.array([recs[int(i)].identity for i in ids])
    cams = np.array([recs[int(i)].camid for i in ids])
    strangers = collect_crops([crops / "query"], pattern=PATTERN)
    feats, pos, _, _ = g.embed_records(strangers)
    q = np.concatenate([stored, feats])
    q_pids = np.concatenate([pids, np.full(len(pos), 9999)])
    q_cams = np.concatenate([cams + 10, [strangers[p].camid for p in pos]])
    return (q, q_pids, q_cams), (stored, pids, cams), len(pos)


def test_calibration_on_one_identity_is_refused_with_the_minimum(tmp_path, crops):
    """One query of one identity (or many queries of one): refused before anything is written, naming the
    minimum; the gallery keeps its generation."""
    g = build_gallery(tmp_path / "gal", crops)
    query, gallery, _ = labelled_split(g, crops)
    gen = g.generation
    one = [np.asarray(a)[:1] for a in query]
    with pytest.raises(ValueError, match=r"too few identities to calibrate on: 1 labelled query of 1 identity; "
                                         r"at least 2 query identities are needed"):
        calibrate_gallery(g, *one, *gallery)
    same = np.asarray(query[1]).copy()
    same[:] = same[0]
    with pytest.raises(ValueError, match=rf"{len(same)} labelled queries of 1 identity; at least 2"):
        calibrate_gallery(g, query[0], same, query[2], *gallery)
    assert g.generation == gen and g.calibration_for(None) is None
    g.close()


def test_calibrate_writes_the_gallery_and_search_flags_hits(tmp_path, crops):
    g = build_gallery(tmp_path / "gal", crops)
    query, gallery, n_strangers = labelled_split(g, crops)
    stranger = sorted((crops / "query").glob("*.jpg"))[0]
    before = g.search([str(stranger)], k=5)
    assert before.calibration is None and all(h.likely is None for h in before[0])  # uncalibrated: as before
    assert before.no_likely_match() is None
    gen = g.generation
    entry = calibrate_gallery(g, *query, *gallery, source="hand split")
    n = len(gallery[0])
    assert (entry["num_queries"], entry["num_true_top1"]) == (n + n_strangers, n)
    assert entry["precision"] == entry["recall"] == 1.0  # the strangers' top scores are all below 1
    assert entry["held_out"]["folds"] == 2 and 0 <= entry["held_out"]["recall"] <= 1
    s, _, _ = top1_scores(query[0], gallery[0], query[1], gallery[1], query[2], gallery[2])
    assert s[n:].max() < entry["threshold"] < 1.0
    assert g.generation == gen + 1 and entry["query_model"] == entry["gallery_model"] == model_digest(g.fingerprint)

    reopened = Gallery.open(tmp_path / "gal")  # stored in the published generation
    assert reopened.calibration_for(None)["threshold"] == entry["threshold"]
    assert reopened.info()["calibration"][0]["source"] == "hand split"
    res = reopened.search([str(stranger)], k=5)
    assert res.threshold == entry["threshold"] and res.no_likely_match() is True
    assert [h.likely for h in res[0]] == [False] * 5
    own = sorted((crops / "bounding_box_test").glob("*.jpg"))[3]
    res = reopened.search([str(own)], k=23)
    assert res[0][0].likely is True and res.no_likely_match() is False
    assert all(h.likely == (h.score >= entry["threshold"]) for h in res[0])

    with BackgroundServer(create_app(tmp_path / "gal")) as server:  # the HTTP API says the same
        info = requests.get(f"{server.url}/api/info", timeout=T).json()
        assert info["calibration"]["threshold"] == entry["threshold"] and info["calibration"]["rule"] == "f1"
        body = requests.post(f"{server.url}/api/search", data=stranger.read_bytes(),
                             params={"filename": stranger.name, "k": 5}, timeout=T).json()
        assert body["calibration"]["threshold"] == entry["threshold"] and body["no_likely_match"] is True
        assert [h["likely"] for h in body["hits"]] == [False] * 5
        body = requests.post(f"{server.url}/api/search", data=own.read_bytes(),
                             params={"filename": own.name, "k": 23}, timeout=T).json()
        assert body["hits"][0]["likely"] is True and body["no_likely_match"] is False
        assert all(h["likely"] == (h["score"] >= entry["threshold"]) for h in body["hits"])
        crop_id = body["hits"][0]["id"]
        body = requests.get(f"{server.url}/api/crops/{crop_id}/search", params={"k": 3}, timeout=T).json()
        assert body["hits"][0]["likely"] is True and "source" not in body["calibration"]


# ----------------------------------------------------------------------------- asymmetric galleries


def none_cfg(*extra: str):
    return load_cfg(None, [*TINY, "MERGE.METHOD", "none", *extra])


@pytest.fixture(scope="module")
def asym(tmp_path_factory, crops) -> Path:
    """An unmerged gallery that accepts merged queries, built with the CLI's opt-in."""
    root = tmp_path_factory.mktemp("asym") / "gal"
    rc = gallery_cli(["build", str(root), str(crops / "bounding_box_test"), "--pattern", PATTERN, "--camera-num",
                      "3", "--opts", *TINY, "MERGE.METHOD", "none", "--accept-merged-queries", "--json"])
    assert rc == 0
    return root


def test_merged_queries_accepted_only_with_the_opt_in(asym, crops, tmp_path, capsys):
    g = Gallery.open(asym)
    assert g.info()["accepts_merged_queries"] and g.fingerprint["merging"] == {"method": "none"}
    q = str(sorted((crops / "bounding_box_test").glob("*.jpg"))[2])
    hits = g.search([q], k=3, cfg=none_cfg("MERGE.METHOD", "tome", "MERGE.LAYERS", "[1, 2]"))[0]
    assert len(hits) == 3 and Path(hits[0].path).name == Path(q).name  # merged query, unmerged gallery
    with pytest.raises(FingerprintMismatch, match="weights"):  # only the merging may differ
        g.search([q], k=3, cfg=none_cfg("MERGE.METHOD", "tome", "SOLVER.SEED", "7"))
    _, merged_fp = g.query_model(none_cfg("MERGE.METHOD", "tome"))
    with pytest.raises(FingerprintMismatch, match="merging.method"):  # its features are not the gallery's own
        g.add_features([], np.zeros((0, g.dim), np.float32), fingerprint=merged_fp)

    plain = Gallery.create(tmp_path / "plain", none_cfg(), camera_num=3)  # without the opt-in: refused as before
    with pytest.raises(FingerprintMismatch, match="merging.method: gallery 'none' != query 'tome'.*"
                                                  "--accept-merged-queries"):
        plain.query_model(none_cfg("MERGE.METHOD", "tome"))
    with pytest.raises(ValueError, match="needs a gallery embedded without token merging"):
        Gallery.create(tmp_path / "merging", none_cfg("MERGE.METHOD", "stm"), camera_num=3,
                       accept_merged_queries=True)
    capsys.readouterr()
    assert gallery_cli(["search", str(tmp_path / "plain"), q, "--opts", "MERGE.METHOD", "tome"]) == 2
    assert "--accept-merged-queries" in capsys.readouterr().err


def test_a_threshold_for_another_query_model_is_not_used(asym, crops, capsys):
    g = Gallery.open(asym)
    tome = none_cfg("MERGE.METHOD", "tome")
    _, tome_fp = g.query_model(tome)
    choice = ThresholdChoice(threshold=0.5, rule="f1", target_precision=None, precision=1.0, recall=1.0, f1=1.0,
                             num_queries=4, num_true_top1=4, num_flagged=4)
    g.set_calibration(calibration_entry(choice, g.fingerprint, tome_fp, "merged queries"))
    q = str(sorted((crops / "query").glob("*.jpg"))[0])
    with pytest.warns(UserWarning, match="calibrated for another query model \\(merging tome\\)"):
        own = g.search([q], k=3)  # the gallery's own (unmerged) model: no threshold for it
    assert own.calibration is None and all(h.likely is None for h in own[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = g.search([q], k=3, cfg=tome)
    assert merged.threshold == 0.5 and all(h.likely == (h.score >= 0.5) for h in merged[0])
    with pytest.raises(ValueError, match="another gallery model"):
        other = Gallery.create(asym.parent / "other", none_cfg("SOLVER.SEED", "9"), camera_num=3)
        g.set_calibration(calibration_entry(choice, other.fingerprint))
    capsys.readouterr()
    assert gallery_cli(["info", str(asym)]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.5000 for queries merging tome" in out and "also from this model with token merging" in out
    assert gallery_cli(["search", str(asym), q, "-k", "2", "--json", "--opts", "MERGE.METHOD", "tome"]) == 0
    answer = json.loads(capsys.readouterr().out)[0]
    assert answer["threshold"] == 0.5 and all(h["likely"] == (h["score"] >= 0.5) for h in answer["results"])


def test_the_server_embeds_uploads_with_a_merged_query_model(asym, crops, tmp_path):
    tome = none_cfg("MERGE.METHOD", "tome")
    g = Gallery.open(asym)
    _, tome_fp = g.query_model(tome)
    choice = ThresholdChoice(threshold=0.25, rule="f1", target_precision=None, precision=1.0, recall=1.0, f1=1.0,
                             num_queries=4, num_true_top1=4, num_flagged=4)
    g.set_calibration(calibration_entry(choice, g.fingerprint, tome_fp))
    f = sorted((crops / "query").glob("*.jpg"))[1]
    expected = Gallery.open(asym).search([str(f)], k=4, cfg=tome)[0]
    with pytest.warns(UserWarning, match="calibrated for another query model"):
        unmerged = {h.id: h.score for h in Gallery.open(asym).search([str(f)], k=23)[0]}
    assert max(abs(h.score - unmerged[h.id]) for h in expected) > 1e-3  # the two query models differ
    with BackgroundServer(create_app(asym, query_cfg=tome)) as server:
        info = requests.get(f"{server.url}/api/info", timeout=T).json()
        assert info["query_merging"]["method"] == "tome" and info["calibration"]["threshold"] == 0.25
        body = requests.post(f"{server.url}/api/search", data=f.read_bytes(), params={"filename": f.name, "k": 4},
                             timeout=T).json()
        assert [h["id"] for h in body["hits"]] == [h.id for h in expected]  # embedded by the merged model
        assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected], abs=1e-4)
        assert body["calibration"]["threshold"] == 0.25
        assert all(h["likely"] == (h["score"] >= 0.25) for h in body["hits"])
    plain = Gallery.create(tmp_path / "plain", none_cfg(), camera_num=3)
    plain.close()
    with pytest.raises(FingerprintMismatch, match="--accept-merged-queries"):
        create_app(tmp_path / "plain", query_cfg=tome)
