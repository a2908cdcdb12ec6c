"""Data: the reference tokenizer, the three sources, clear errors on bad data, and the global batch plan."""

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import make_reviews, write_aclimdb, write_parquet
from distsent.config import DataConfig
from distsent.data import prepare
from distsent.records import DataError
from distsent.sources import find_source, load_splits, located
from distsent.tokenizer import train_tokenizer
from distsent.sampler import Layout, epoch_batches


def reference_tokenize(text):  # the tutorial's tokenizer
    return re.findall(r"\b\w+\b", text.lower())


SAMPLES = ["This movie was ABSOLUTELY fantastic!!! 10/10", "Don't watch it<br /><br />ever, it's_bad.",
           "Naïve café-goers über-love it — 日本語 too", "  spaces\tand\nnewlines  ", "…", "1,000 cuts... C'est la vie"]


def test_prepared_ids_match_the_saved_tokenizer(tmp_path, monkeypatch):
    """Data preparation cuts words in bulk (numpy over UTF-8 bytes); prediction encodes with the saved tokenizer.json
    (`encode`, the tokenizers library): every cached review's ids must be what prediction gives it, also where it
    tokenizes a long text a piece at a time (here every text over 5 characters, cut at whitespace)."""
    import distsent.tokenizer
    from distsent.tokenizer import encode

    # "end", "!", "start": a review without words between two that touch words must not create an empty word;
    # U+31350 is a letter of Unicode 15, which this Python's unicodedata may not know yet; U+0130 (İ) lowercases to
    # "i" plus a combining dot in Unicode's full mapping, which is not a word character
    texts = SAMPLES + make_reviews(50, 9)[0] + ["ÀÉÎ õü ß ﬁne Ⅻ ½ x²", "tabs\tand_underscores__ 3.14", "end", "!", "—",
                                                "start", "a\U00031350b 𝔘𝔫𝔦 😀x", "İstanbul'da İYİ", "İstanbul",
                                                # symbols: each its own token with data.symbols, a separator without
                                                "SO angry!!! 😡😡 #fail :)", "👍🏽👨‍👩‍👧", "a‿b﹏c x_y", "(12)£€…»",
                                                # symbols of Unicode 16 (an emoji, a control picture): RE2's tables
                                                # (pyarrow) predate them, tokenizer.json's engine knows them
                                                "so tired \U0001FAE9 today \u2427",
                                                # a line break whose spaces are not ASCII ones stays words
                                                "great film<br\u00a0/>br the end<br\u3000/>x<br \x0b/>y<br\t/>z"]
    labels = [i % 2 for i in range(len(texts))]
    folder = write_parquet(tmp_path / "data", {"train": (texts, labels), "test": (texts[::-1], labels[::-1])})
    sources = {"train": texts, "val": texts, "test": texts[::-1]}
    for strip_html, symbols in ((False, False), (True, False), (False, True), (True, True)):
        data = prepare(DataConfig(path=str(folder), min_freq=2, strip_html=strip_html, symbols=symbols,
                                  max_len=10_000, cache_dir=str(tmp_path / "cache")))
        assert ("!" in data.tokenizer.get_vocab()) == symbols and ("😡" in data.tokenizer.get_vocab()) == symbols
        for name, originals in sources.items():
            split = getattr(data, name)
            reviews = [originals[i] for i in split.ids]
            predicted = encode(data.tokenizer, reviews, max_len=10_000, truncate="head")
            with monkeypatch.context() as m:
                m.setattr(distsent.tokenizer, "LONG_TEXT", 5)
                in_pieces = encode(data.tokenizer, reviews, max_len=10_000, truncate="head")
            for i, text in enumerate(reviews):
                cached = split.tokens[split.offsets[i]: split.offsets[i + 1]].tolist()
                assert cached == predicted.tokens[predicted.offsets[i]: predicted.offsets[i + 1]].tolist(), text
                assert cached == in_pieces.tokens[in_pieces.offsets[i]: in_pieces.offsets[i + 1]].tolist(), text
                assert cached == data.tokenizer.encode(text, add_special_tokens=False).ids, text


def test_a_long_text_in_pieces_has_the_ids_of_the_whole(monkeypatch):
    """Texts over LONG_TEXT characters are tokenized in pieces cut at whitespace, never inside an HTML line break:
    the ids are those of the whole text, for every text rule and for tokenizer.json files that saved the older
    break pattern (any Unicode space inside the break)."""
    import json

    from tokenizers import Tokenizer

    import distsent.tokenizer as tokenizer

    rng = np.random.default_rng(3)
    bits = ["good", "Bad", "<br />", "<br/>", "<br \t/>", "<br\u3000 />", "<br\x0b />", "<BR />", "İstanbul", "x_1",
            " ", "  ", "\t", "\n", "\x1c", "\u2028", "\u00a0", "a,b", "!!", "日本語", "e\u0301", "😡", "/>", "<"]
    texts = ["".join(rng.choice(bits, size=int(rng.integers(1, 40)))) for _ in range(300)] + ["<br />", " a", "a "]
    toks = [tokenizer.build_tokenizer(["good", "bad", "br", "x_1", "a", "b", "!", "😡", "<", "/", ">"], low, html, sym)
            for sym in (False, True) for low in (False, True) for html in (False, True)]
    older = json.loads(toks[-1].to_str())  # the break as saved before it was spelt out
    older["normalizer"]["normalizers"][0]["pattern"]["Regex"] = tokenizer.HTML_BREAK_BEFORE
    toks.append(Tokenizer.from_str(json.dumps(older)))
    for long_text in (1, 2, 3, 5):
        monkeypatch.setattr(tokenizer, "LONG_TEXT", long_text)
        for tok in toks:
            for text in texts:
                whole = tok.encode(text, add_special_tokens=False).ids
                assert tokenizer._long_text_ids(tok, text).tolist() == whole, (long_text, text)


def test_bulk_encoding_on_several_cores_matches_one_review_at_a_time(monkeypatch):
    """Thousands of reviews are cut and hashed in shares on several threads, and the shares' dictionaries merged;
    the ids must still be those of encoding each review alone with tokenizer.json, and the vocabulary that of
    the tutorial's tokenizer (words at the end of one review and the start of the next stay apart)."""
    import distsent.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    reviews = make_reviews(900, 11)[0]
    texts = [reviews[i] if i % 5 else SAMPLES[i // 5 % len(SAMPLES)] for i in range(len(reviews))] * 7
    distinct, index, offsets = tokenizer.index_words(texts)
    assert len(offsets) == len(texts) + 1 and offsets[-1] == len(index)
    words = distinct.to_pylist()
    for i in (0, 1, 2, 3, 4, 5, 2999, 3000, 6299):
        assert [words[j] for j in index[offsets[i]: offsets[i + 1]]] == reference_tokenize(texts[i]), texts[i]
    tok = train_tokenizer(texts, DataConfig(min_freq=3))
    counts = Counter(w for t in texts for w in reference_tokenize(t))
    assert set(tok.get_vocab()) == {"<pad>", "<unk>"} | {w for w, c in counts.items() if c >= 3}
    for symbols in (False, True):  # with data.symbols, every symbol is a word: "!!!" is three
        distinct, index, offsets = tokenizer.index_words(texts, symbols=symbols)
        tok = train_tokenizer(texts, DataConfig(min_freq=3, symbols=symbols))
        ids = tokenizer.word_ids(tok, distinct)[index]
        for i in range(0, len(texts), 97):
            assert ids[offsets[i]: offsets[i + 1]].tolist() == tok.encode(texts[i], add_special_tokens=False).ids
    assert Counter(distinct.take(index[offsets[0]: offsets[1]]).to_pylist())["!"] == 3  # "...fantastic!!! 10/10"


def test_tokenizer_matches_reference_words_and_vocabulary():
    corpus = SAMPLES * 3 + ["rare words here"]
    tok = train_tokenizer(corpus, DataConfig(min_freq=3))
    vocab = tok.get_vocab()
    counts = Counter(w for t in corpus for w in reference_tokenize(t))
    assert set(vocab) == {"<pad>", "<unk>"} | {w for w, c in counts.items() if c >= 3}
    assert vocab["<pad>"] == 0 and vocab["<unk>"] == 1
    for text in SAMPLES + ["rare words here"]:
        expected = [w if counts[w] >= 3 else "<unk>" for w in reference_tokenize(text)]
        assert [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False).ids] == expected


@pytest.fixture
def splits():
    return {"train": make_reviews(60, 3), "test": make_reviews(20, 4)}


def test_three_sources_load_the_same_records(tmp_path, splits, monkeypatch):
    # aclImdb files are read back in (neg, pos) order by id, so compare as sets of (text, label)
    def records(cfg):  # validation is carved from train in record order, which differs: compare train + val
        carved, names = load_splits(cfg)
        assert names == ["negative", "positive"]
        pairs = {name: list(zip(s.texts.to_pylist(), s.labels.tolist())) for name, s in carved.items()}
        return sorted(pairs["train"] + pairs["val"]), sorted(pairs["test"])

    parquet = DataConfig(path=str(write_parquet(tmp_path / "pq", splits)))
    acl = DataConfig(path=str(write_aclimdb(tmp_path / "raw" / "aclImdb", splits).parent))
    assert (find_source(parquet).kind, find_source(acl).kind) == ("files", "aclimdb")

    # The hub cannot be reached from here: datasets.load_dataset is replaced by one that serves the same records
    # (the only mock in this file). Everything after the download is the real code path.
    import datasets

    def fake_load_dataset(name, config, split):
        assert (name, config) == ("stanfordnlp/imdb", None)
        texts, labels = splits[split]
        return datasets.Dataset.from_dict({"text": texts, "label": labels})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("DISTSENT_DATA_PATH", raising=False)
    assert find_source(DataConfig()).kind == "hub"
    assert records(parquet) == records(acl) == records(DataConfig())
    assert records(parquet) == (sorted(zip(*splits["train"])), sorted(zip(*splits["test"])))


def test_an_aclimdb_review_rewritten_in_place_is_new_data(tmp_path, splits):
    """Rewriting a review file changes no folder's stats: the cache key must still change, or the old tokens are
    served for the new text."""
    cfg = DataConfig(path=str(write_aclimdb(tmp_path / "aclImdb", splits).parent), cache_dir=str(tmp_path / "cache"),
                     min_freq=1)
    first = prepare(cfg)
    assert prepare(cfg).cache_hit
    review = sorted((tmp_path / "aclImdb" / "train" / "pos").glob("*.txt"))[0]
    review.write_text("zebra crossings everywhere, a brand new review")
    again = prepare(cfg)
    assert not again.cache_hit and "zebra" in again.tokenizer.get_vocab()
    assert "zebra" not in first.tokenizer.get_vocab()


def test_a_saved_tokenizer_with_other_rules_is_refused_from_the_cache_too(tmp_path, splits):
    """A resumed run's tokenizer.json lowercases; a config that does not is refused, whether or not the token cache
    already holds that tokenizer's ids (the ids would not be the ones the config asks for)."""
    folder = write_parquet(tmp_path / "pq", splits)
    cfg = DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache"), min_freq=1)
    tok = tmp_path / "tokenizer.json"
    tok.write_text(prepare(cfg).tokenizer.to_str())
    assert prepare(cfg, tok).cache_hit
    for other in (DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache"), min_freq=1, lowercase=False),
                  DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache"), min_freq=1, lowercase=False,
                             max_len=7)):  # a cache hit, then a miss
        with pytest.raises(DataError, match="differ from the config's data.lowercase=False"):
            prepare(other, tok)


def test_training_content_digest_follows_the_data_not_its_place(tmp_path, splits):
    """The resume identity's data_content: the same records copied elsewhere (new paths and file times, a fresh
    cache) give the same digest; one edited training label changes it; a different test split does not."""
    import shutil

    first = prepare(DataConfig(path=str(write_parquet(tmp_path / "a", splits)), cache_dir=str(tmp_path / "c1")))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = prepare(DataConfig(path=str(tmp_path / "b"), cache_dir=str(tmp_path / "c2")))
    assert first.content and moved.content == first.content and not moved.cache_hit
    texts, labels = splits["train"]
    edited = {"train": (texts, [1 - labels[0]] + labels[1:]), "test": splits["test"]}
    changed = prepare(DataConfig(path=str(write_parquet(tmp_path / "e", edited)), cache_dir=str(tmp_path / "c1")))
    assert changed.content != first.content
    other_test = {"train": splits["train"], "test": (splits["test"][0][:5], splits["test"][1][:5])}
    same = prepare(DataConfig(path=str(write_parquet(tmp_path / "t", other_test)), cache_dir=str(tmp_path / "c1")))
    assert same.content == first.content


def test_env_variable_points_at_local_copy(tmp_path, splits, monkeypatch, caplog):
    """$DISTSENT_DATA_PATH is the default data set's (IMDB's) local copy: a config that names another hub data set
    reads that one (here: fails to reach the hub), with a warning, not IMDB's copy; data.path wins over both."""
    monkeypatch.setenv("DISTSENT_DATA_PATH", str(write_parquet(tmp_path, splits)))
    assert find_source(DataConfig()).files["train"] == tmp_path / "train.parquet"
    other = DataConfig(hub_name="example/tickets")
    assert find_source(other).kind == "hub" and located(other).path == ""
    assert "$DISTSENT_DATA_PATH (" + str(tmp_path) + ") is ignored" in caplog.text
    own = write_parquet(tmp_path / "own", splits)
    assert find_source(replace(other, path=str(own))).files["train"] == own / "train.parquet"
    named = DataConfig(train_file=str(own / "train.parquet"), test_file=str(own / "test.parquet"))
    assert located(named).path == "" and find_source(located(named)).files["train"] == own / "train.parquet"
    monkeypatch.setenv("DISTSENT_DATA_PATH", str(tmp_path / "nowhere"))  # the error names what set the folder
    with pytest.raises(DataError, match=r"^\$DISTSENT_DATA_PATH \S*nowhere: no such folder"):
        find_source(DataConfig())


def test_validation_carved_from_train_seeded_and_disjoint(splits, tmp_path):
    cfg = DataConfig(path=str(write_parquet(tmp_path, splits)), val_fraction=0.25)
    a, _ = load_splits(cfg)
    b, _ = load_splits(cfg)
    assert len(a["val"].ids) == 15 and len(a["train"].ids) == 45
    assert not set(a["val"].ids) & set(a["train"].ids)
    assert (a["val"].ids == b["val"].ids).all()
    assert len(a["test"].ids) == 20  # test is never touched by the split
    # data.test_limit keeps the same test texts whatever the carve's seed and the training texts' number
    subsets = [load_splits(DataConfig(path=cfg.path, test_limit=7, **extra))[0]["test"].ids.tolist()
               for extra in ({}, {"split_seed": 3}, {"limit": 20}, {"val_fraction": 0.5})]
    assert len(subsets[0]) == 7 and all(s == subsets[0] for s in subsets)


def test_bad_data_errors_name_the_file(tmp_path, splits):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def source_error(folder):
        with pytest.raises(DataError) as info:
            load_splits(DataConfig(path=str(folder)))
        return str(info.value)

    missing = write_parquet(tmp_path / "missing", {"train": splits["train"]})
    assert "no test file" in source_error(missing)

    empty = write_parquet(tmp_path / "empty", {"train": splits["train"], "test": ([], [])})
    assert "test.parquet: the split is empty" in source_error(empty)

    unseen = write_parquet(tmp_path / "label", {"train": splits["train"], "test": (["a", "b", "c"], [0, 1, 2])})
    assert re.search(r"test.parquet: row 2 has label 2, which is not one of the classes", source_error(unseen))

    no_text = tmp_path / "notext"
    no_text.mkdir()
    pq.write_table(pa.table({"review": ["x"], "label": [1]}), no_text / "train.parquet")
    pq.write_table(pa.table({"review": ["x"], "label": [1]}), no_text / "test.parquet")
    assert "train.parquet: no 'text' column (columns: review, label)" in source_error(no_text)

    assert "no such folder" in source_error(tmp_path / "nowhere")
    # a relative path is named as given and as the working directory makes it (a Slurm job's may be elsewhere)
    assert source_error("mydata") == f"data.path mydata: no such folder ({Path.cwd() / 'mydata'})"
    (tmp_path / "other").mkdir()
    assert "holds no train / test files" in source_error(tmp_path / "other")

    acl = write_aclimdb(tmp_path / "acl", splits)
    (acl / "train" / "pos" / "999_9.txt").write_bytes(b"caf\xe9 bad bytes")
    assert "999_9.txt: not valid UTF-8" in source_error(acl)
    (acl / "train" / "pos" / "999_9.txt").write_text(" \n\u00a0")
    assert f"{acl / 'train' / 'pos' / '999_9.txt'}: an empty review" in source_error(acl)


def test_prepare_caches_and_reuses(tmp_path, splits):
    cfg = DataConfig(path=str(write_parquet(tmp_path / "d", splits)), cache_dir=str(tmp_path / "c"), min_freq=1)
    first = prepare(cfg)
    second = prepare(cfg)
    assert not first.cache_hit and second.cache_hit
    for name in ("train", "val", "test"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a.tokens == b.tokens).all() and (a.offsets == b.offsets).all() and (a.labels == b.labels).all()
    assert first.train.lengths.max() <= cfg.max_len


def test_a_damaged_cache_entry_is_reported_and_rebuilt(tmp_path, splits, caplog):
    """A node that died while writing, or a full disk, can leave a cached array cut short: the next run says which
    file and rebuilds it, instead of failing in numpy."""
    cfg = DataConfig(path=str(write_parquet(tmp_path / "d", splits)), cache_dir=str(tmp_path / "c"), min_freq=1)
    first = prepare(cfg)
    (cached,) = (tmp_path / "c").glob("*/tok-*/train.tokens.npy")
    cached.write_bytes(cached.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = prepare(cfg)
    assert not again.cache_hit and f"{cached}: " in caplog.text and "rebuilding" in caplog.text
    assert (again.train.tokens == first.train.tokens).all()
    assert prepare(cfg).cache_hit  # the rebuilt entry is whole again
    # a manifest edited into other JSON (an entry that is no size and checksum; no class names): rebuilt too
    for edit, said in ((lambda m: m["files"].update({"train.tokens.npy": "x"}), "is not a size and a checksum"),
                       (lambda m: m.pop("label_names"), "no class names")):
        (manifest,) = (tmp_path / "c").glob("*/tok-*/manifest.json")
        edited = json.loads(manifest.read_text())
        edit(edited)
        manifest.write_text(json.dumps(edited))
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert not prepare(cfg).cache_hit and said in caplog.text and "rebuilding" in caplog.text


def test_tail_truncation_keeps_the_end(tmp_path):
    texts = [" ".join(f"w{i}" for i in range(100))]
    data = {"train": (texts * 4, [1, 0, 1, 0]), "test": (texts, [1])}
    cfg = DataConfig(path=str(write_parquet(tmp_path / "d", data)), cache_dir=str(tmp_path / "c"), min_freq=1,
                     max_len=10, truncate="tail", val_fraction=0.25)
    p = prepare(cfg)
    ids = p.test.tokens[p.test.offsets[0]: p.test.offsets[1]]
    assert [p.tokenizer.id_to_token(int(i)) for i in ids] == [f"w{i}" for i in range(90, 100)]


@pytest.mark.parametrize("world, micro", [(1, 0), (2, 0), (4, 0), (1, 16), (2, 8), (2, 16), (4, 4)])
def test_shards_disjoint_and_cover_each_epoch(world, micro):
    """Every sample of an epoch in exactly one micro-batch of one rank, with and without gradient accumulation."""
    lengths = np.random.default_rng(0).integers(1, 300, 1001)
    layout = Layout.build(64, world, micro)
    assert layout.accum_steps == (64 // world // micro if micro else 1)
    for epoch in range(2):
        batches = epoch_batches(lengths, 64, seed=5, epoch=epoch, bucket_batches=8)
        per_rank = [np.concatenate([m for b in batches for m in layout.micro_batches(b, r)]) for r in range(world)]
        everything = np.concatenate(per_rank)
        assert len(everything) == len(lengths) and set(everything.tolist()) == set(range(len(lengths)))
        for r in range(world):
            for q in range(r + 1, world):
                assert not set(per_rank[r].tolist()) & set(per_rank[q].tolist())


def test_plan_depends_on_seed_and_epoch_only():
    lengths = np.random.default_rng(1).integers(1, 300, 500)
    a = epoch_batches(lengths, 32, seed=1, epoch=3, bucket_batches=4)
    assert all((x == y).all() for x, y in zip(a, epoch_batches(lengths, 32, seed=1, epoch=3, bucket_batches=4)))
    b = epoch_batches(lengths, 32, seed=1, epoch=4, bucket_batches=4)
    assert any((x != y).any() for x, y in zip(a, b))
    # bucketing: batches hold similar lengths, so padding is far below that of random batches
    pad = sum(lengths[x].max() * len(x) - lengths[x].sum() for x in a)
    unbucketed = epoch_batches(lengths, 32, seed=1, epoch=3, bucket_batches=1)
    assert pad < 0.5 * sum(lengths[x].max() * len(x) - lengths[x].sum() for x in unbucketed)


def test_world_size_that_cannot_form_global_batch_is_refused():
    with pytest.raises(ValueError, match=r"over 3 processes; process counts that work: 1, 2, 4, 8"):
        Layout.build(64, 3)
    assert Layout.build(64, 1, micro_batch_cap=32).accum_steps == 2
    assert Layout.build(64, 4).micro_batch == 16


def test_a_data_file_rewritten_with_its_old_size_and_time_is_new_data(tmp_path, splits):
    """cp -p, rsync -a and touch -r keep a file's modification time; with the same size too, only the inode change
    time (and, for a copy, the inode) tells that the content changed: the old tokens must not be served."""
    import os

    folder = write_parquet(tmp_path / "d", splits)
    cfg = DataConfig(path=str(folder), cache_dir=str(tmp_path / "c"), min_freq=1)
    first = prepare(cfg)
    train = folder / "train.parquet"
    before = train.stat()
    flipped = {**splits, "train": (splits["train"][0], [1 - y for y in splits["train"][1]])}
    write_parquet(tmp_path / "flipped", flipped)
    data = (tmp_path / "flipped" / "train.parquet").read_bytes()
    assert len(data) == before.st_size
    train.write_bytes(data)
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = prepare(cfg)
    assert not again.cache_hit and (again.train.labels == 1 - first.train.labels).all()


def test_the_cache_knows_data_files_by_their_content_not_their_stamps(tmp_path, splits, monkeypatch):
    """An image file system built with fixed times (squashfs, Apptainer) shows an edited file with the size, times
    and inode of the old one (stood in for: every file stamped alike): its content tells the cache it is new data.
    The same bytes written again (a fresh copy: new inode and times) are the same data, and hit."""
    import distsent.sources

    monkeypatch.setattr(distsent.sources, "_stamp", lambda st: "one stamp for every file")
    folder = write_parquet(tmp_path / "d", splits)
    cfg = DataConfig(path=str(folder), cache_dir=str(tmp_path / "c"), min_freq=1)
    first = prepare(cfg)
    train = folder / "train.parquet"
    data = train.read_bytes()
    train.unlink()
    train.write_bytes(data)
    assert prepare(cfg).cache_hit
    write_parquet(folder, {"train": (splits["train"][0], [1 - y for y in splits["train"][1]])})
    again = prepare(cfg)
    assert not again.cache_hit and (again.train.labels == 1 - first.train.labels).all()


def test_cache_writers_keep_to_their_own_temporary_folders(tmp_path, splits, monkeypatch, caplog):
    """A preparation writes its entry in a temporary folder of its own: another container's writer, whose pid may
    be this one's, keeps its folder; a preparation interrupted (Ctrl-C) removes its own; one killed outright leaves
    it, and the next preparation names it for removal once a day old."""
    import os
    import time

    from distsent.tokenizer import TokenizedSplit

    cfg = DataConfig(path=str(write_parquet(tmp_path / "d", splits)), cache_dir=str(tmp_path / "c"), min_freq=1)
    save = TokenizedSplit.save

    def interrupted(self, folder, name):
        save(self, folder, name)
        (folder.parent / f"{folder.name.split('.tmp')[0]}.tmp{os.getpid()}").mkdir(exist_ok=True)  # another's
        (folder.parent / "x.tmp1-dead").mkdir(exist_ok=True)  # one killed long ago
        os.utime(folder.parent / "x.tmp1-dead", (time.time() - 2 * 86400,) * 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(TokenizedSplit, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    left = sorted(p.name for p in (tmp_path / "c").rglob("*.tmp*"))
    assert len(left) == 2 and left[0].endswith(f".tmp{os.getpid()}") and left[1] == "x.tmp1-dead", left
    monkeypatch.setattr(TokenizedSplit, "save", save)
    with caplog.at_level("WARNING"):
        assert not prepare(cfg).cache_hit
    assert sorted(p.name for p in (tmp_path / "c").rglob("*.tmp*")) == left
    assert re.search(r"token cache: 1 unfinished entry left by preparations that were killed: rm -r \S*x.tmp1-dead",
                     caplog.text)


def test_the_cache_entries_of_edited_files_are_named_for_removal_and_kept(tmp_path, splits, caplog):
    """Editing a data file and training again (a user cleaning their own data) leaves the earlier version's tokens
    in the cache, where no run can hit them again. Preparing the edited files names the entries this host prepared
    of them (whatever their split settings) with their size and a command that removes them, and only those: not
    other files' entries, nor another node's of the same path (its own node-local copy, in a shared cache), nor a
    malformed record. Nothing is removed: a run started before the edit may still be reading one."""
    import json
    import shlex

    cache = tmp_path / "my cache"  # a space: the command quotes the paths
    folder, other = write_parquet(tmp_path / "d", splits), write_parquet(tmp_path / "o", splits)
    cfg = DataConfig(path=str(folder), cache_dir=str(cache), min_freq=1)
    for config in (cfg, DataConfig(path=str(folder), cache_dir=str(cache), min_freq=1, test_limit=5),
                   DataConfig(path=str(folder), cache_dir=str(cache), min_freq=1, test_limit=7),
                   DataConfig(path=str(other), cache_dir=str(cache), min_freq=1)):
        prepare(config)
    records = {p.parent: json.loads(p.read_text()) for p in cache.glob("*/source.json")}
    ours = sorted(str(f) for f, r in records.items() if r["place"]["location"] == str(folder.resolve()))
    assert len(records) == 4 and len(ours) == 3
    node_b = Path(ours.pop())
    (node_b / "source.json").write_text(json.dumps({**records[node_b], "host": "node-b"}))
    (cache / "stray").mkdir()
    (cache / "stray" / "source.json").write_text("[1]")
    edited = {**splits, "train": (splits["train"][0], [1 - y for y in splits["train"][1]])}
    write_parquet(folder, edited)
    with caplog.at_level("INFO"):
        again = prepare(cfg)
    assert not again.cache_hit and len(list(cache.glob("*/source.json"))) == 6  # nothing removed
    (line,) = [r.getMessage() for r in caplog.records if "earlier versions" in r.getMessage()]
    assert line.startswith(f"token cache: 2 entries of earlier versions of {folder.resolve()} (")
    assert sorted(shlex.split(line.split("rm -r ")[1])) == ours
    caplog.clear()
    with caplog.at_level("INFO"):  # a hit prepares nothing, and names nothing
        assert prepare(cfg).cache_hit and "earlier versions" not in caplog.text


def test_a_damaged_token_cache_entry_is_rebuilt_and_an_unreadable_one_left_alone(tmp_path, splits, caplog,
                                                                                   monkeypatch):
    """A cut id array is damage: reported, removed, rebuilt. A read that fails for another reason (too many open
    files; no permission, which root here cannot be refused: stood in for by the loader raising) is not: the entry
    may be another user's or memory-mapped by other runs, so it is named in a DataError and left in place."""
    import errno

    from distsent.tokenizer import TokenizedSplit

    cfg = DataConfig(path=str(write_parquet(tmp_path / "d", splits)), cache_dir=str(tmp_path / "c"), min_freq=1)
    first = prepare(cfg)
    (ids,) = (tmp_path / "c").glob("*/tok-*/train.tokens.npy")
    ids.write_bytes(ids.read_bytes()[:-8])
    with caplog.at_level("WARNING"):
        again = prepare(cfg)
    assert "token cache entry damaged, rebuilding it" in caplog.text and not again.cache_hit
    assert (again.train.tokens == first.train.tokens).all() and prepare(cfg).cache_hit
    entry = sorted(p.name for p in ids.parent.iterdir())

    def refused(folder, split):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(TokenizedSplit, "load", refused)
    with pytest.raises(DataError, match=rf"token cache {re.escape(str(ids.parent))}: cannot be read .*Too many open"):
        prepare(cfg)
    assert sorted(p.name for p in ids.parent.iterdir()) == entry

    def removed(folder, split):  # another run removed the entry while this one read it: prepared again
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(folder / f"{split}.ids.npy"))

    monkeypatch.setattr(TokenizedSplit, "load", removed)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert not prepare(cfg).cache_hit
    assert "token cache entry changed while it was read" in caplog.text


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\xff\xfe" + b])
def test_a_damaged_cached_tokenizer_is_reported_and_rebuilt(tmp_path, splits, caplog, damage, monkeypatch):
    """Also where it cannot be removed first (a cache folder without write permission, which root here is never
    refused: stood in for by unlink raising): the rebuilt one replaces it, or its write names the problem."""
    cfg = DataConfig(path=str(write_parquet(tmp_path / "d", splits)), cache_dir=str(tmp_path / "c"), min_freq=1)
    first = prepare(cfg)
    (cached,) = (tmp_path / "c").glob("*/tokenizer-*.json")
    cached.write_bytes(damage(cached.read_bytes()))

    def refused(path, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "unlink", refused)
    with caplog.at_level("WARNING"):
        again = prepare(cfg)
    assert f"{cached} is damaged, rebuilding it" in caplog.text
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    assert (again.train.tokens == first.train.tokens).all()
    assert prepare(cfg).cache_hit
