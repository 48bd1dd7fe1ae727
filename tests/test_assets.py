"""The offline text-classification tasks of benchmarks/quality.py: fixed held-out splits, no text in both, the
labels named alike in both splits."""

import pytest

assets = pytest.importorskip("examples.assets")


def _require(name):
    try:
        return getattr(assets, name)()
    except assets.AssetNotFoundError as error:
        pytest.skip(str(error))


def test_reuters_r8_keeps_its_own_split_and_its_eight_unbalanced_topics():
    data = _require("load_reuters_r8")
    assert (len(data["train"]), len(data["test"])) == (5485, 2189)
    names = data["train"].features["label"].names
    assert data["test"].features["label"].names == names and len(names) == 8
    counts = {names[c]: data["train"]["label"].count(c) for c in range(8)}
    assert counts["earn"] == 2840 and counts["grain"] == 41
    assert all(text == text.lower() and text for text in data["test"]["text"][:50])


def test_election_tweets_split_is_fixed_stratified_and_disjoint():
    data, again, other = _require("load_election_tweets"), assets.load_election_tweets(), \
        assets.load_election_tweets(seed=1)
    assert data["train"].features["label"].names == ["HillaryClinton", "realDonaldTrump"]
    assert len(data["test"]) == 1000 and data["test"]["text"] == again["test"]["text"]
    assert data["test"]["text"] != other["test"]["text"]
    assert not set(data["train"]["text"]) & set(data["test"]["text"])
    share = sum(data["test"]["label"]) / 1000
    assert abs(share - sum(data["train"]["label"]) / len(data["train"])) < 0.002
