"""Model: padding invariance for every option, the ability to fit a tiny batch, the n-gram head and ensembles."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import member_alone
from distsent.config import ModelConfig
from distsent.model import Ensemble, SentimentRNN, build_model

OPTIONS = list(itertools.product(["lstm", "gru"], [False, True], ["last", "mean", "max", "attention"]))


@pytest.mark.parametrize("cell, bidirectional, pooling", OPTIONS)
def test_padding_invariance(cell, bidirectional, pooling):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, bidirectional=bidirectional, pooling=pooling, embedding_dim=16, hidden_dim=24,
                      num_layers=2)
    model = build_model(200, cfg).eval()
    short = torch.randint(2, 200, (1, 9))
    long = torch.randint(2, 200, (1, 120))
    batch = torch.zeros(2, 120, dtype=torch.long)
    batch[0, :9], batch[1] = short, long
    alone = model(short, torch.tensor([9]))
    together = model(batch, torch.tensor([9, 120]))
    assert torch.allclose(alone, together[:1], atol=1e-5), (alone, together)
    # the padding really is there: reading the state after it (the seed's defect) would change the answer
    assert not torch.allclose(model(batch[:1], torch.tensor([120])), alone, atol=1e-5)


def test_overfits_tiny_batch():
    torch.manual_seed(0)
    model = build_model(50, ModelConfig(embedding_dim=16, hidden_dim=32, num_layers=2, dropout=0.0))
    ids = torch.randint(2, 50, (16, 12))
    lengths = torch.randint(3, 13, (16,))
    labels = (torch.arange(16) % 2).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids, lengths), labels)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert ((model(ids, lengths) > 0).float() == labels).all()


def test_stacked_layers_equal_one_multi_layer_module_and_load_its_weights():
    """A one-direction model keeps one module per layer (its dropout between layers then draws from torch's
    generator, which checkpoints restore; cuDNN's own does not): it computes what a single multi-layer nn.LSTM with
    the same dropout computes, draw for draw, and weights saved in that module's layout (earlier versions) load."""
    cfg = ModelConfig(embedding_dim=12, hidden_dim=10, num_layers=3, dropout=0.5, bidirectional=False)
    model = build_model(40, cfg)
    stock = torch.nn.LSTM(12, 10, num_layers=3, dropout=0.5, batch_first=True)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("rnn.")}
    old.update({f"rnn.{k}": v for k, v in stock.state_dict().items()})  # rnn.weight_ih_l2, ...
    model.load_state_dict(old)
    assert torch.equal(model.rnn[2].weight_hh_l0, stock.weight_hh_l2)
    x = torch.randn(4, 6, 12)
    for train in (True, False):
        model.train(train), stock.train(train)
        torch.manual_seed(3)
        ours = model._recurrent(x, torch.full((4,), 6))
        torch.manual_seed(3)
        assert torch.equal(ours, stock(x)[0])


def test_bf16_fallback_runs_rnn_in_fp32():
    """With the fallback on, the recurrent layer computes in fp32 under bf16 autocast (on any CPU); the classifier
    layer still runs in bf16."""
    model = build_model(50, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1))
    model.rnn_fp32 = True
    seen = {}
    model.rnn[0].register_forward_hook(lambda m, args, out: seen.update(rnn=(args[0].dtype, out[0].dtype)))
    model.fc.register_forward_hook(lambda m, args, out: seen.update(fc=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(2, 50, (3, 7)), torch.tensor([7, 5, 2]))
    out.float().sum().backward()
    assert seen == {"rnn": (torch.float32, torch.float32), "fc": torch.bfloat16}
    assert out.shape == (3,) and model.embedding.weight.grad is not None


def test_pretrained_embeddings_initialise_known_words(tmp_path, monkeypatch):
    from distsent.records import DataError
    from distsent.embeddings import init_embedding

    vocab = {"<pad>": 0, "<unk>": 1, "good": 2, "bad": 3, "rare": 4}
    f = tmp_path / "vectors.txt"
    f.write_text("3 4\ngood 1 2 3 4\nBAD -1 -2 -3 -4\nother 9 9 9 9\n")  # word2vec header, a capitalised word
    emb = torch.nn.Embedding(5, 4, padding_idx=0)
    before = emb.weight[4].clone()
    coverage = init_embedding(emb, str(f), vocab, freeze=True)
    assert coverage == pytest.approx(2 / 5)
    assert emb.weight[2].tolist() == [1, 2, 3, 4] and emb.weight[3].tolist() == [-1, -2, -3, -4]
    assert torch.equal(emb.weight[4], before) and not emb.weight.requires_grad
    # a byte-order mark, a capitalised word before the exact one, a word holding spaces, a blank line
    f.write_text("\ufeffgood 1 2 3 4\nBad 9 9 9 9\n. . . 5 5 5 5\n\nbad 1 1 1 1\nRARE 7 7 7 7\n", encoding="utf-8")
    assert init_embedding(emb, str(f), vocab, freeze=True) == pytest.approx(3 / 5)
    assert [emb.weight[i].tolist() for i in (2, 3, 4)] == [[1, 2, 3, 4], [1, 1, 1, 1], [7, 7, 7, 7]]
    monkeypatch.setenv("HOME", str(tmp_path))  # a path under ~, as --check reads it
    assert init_embedding(emb, "~/vectors.txt", vocab, freeze=True) == pytest.approx(3 / 5)
    f.write_text("good 1 2 3\n")
    with pytest.raises(DataError, match=r"vectors.txt:1: 3 values, model.embedding_dim is 4"):
        init_embedding(emb, str(f), vocab, freeze=False)
    f.write_text("good\t1\t2\t3\t4\n")
    with pytest.raises(DataError, match=r"vectors.txt:1: 0 values, model.embedding_dim is 4 \(values are separated by"):
        init_embedding(emb, str(f), vocab, freeze=False)
    (tmp_path / "vectors.txt.gz").write_bytes(b"\x1f\x8b\x08")
    with pytest.raises(DataError, match=r"vectors.txt.gz is compressed or binary; give the text file"):
        init_embedding(emb, str(tmp_path / "vectors.txt.gz"), vocab, freeze=False)
    f.write_text("good 1 2 3 4\nbad 1 nan 3 4\n")
    with pytest.raises(DataError, match=r"vectors.txt:2: 'bad' has a non-finite value"):
        init_embedding(emb, str(f), vocab, freeze=False)
    f.write_bytes(b"good 1 2 3 4\nwe\rird 5 5 5 5\n")  # a \r inside a word is part of it, not a line break
    assert init_embedding(emb, str(f), vocab, freeze=False) == pytest.approx(1 / 5)
    for text in ("", "3 4\n", "other 1 2 3 4\n"):  # empty, a header alone, no vocabulary word
        f.write_text(text)
        with pytest.raises(DataError, match=r"vectors.txt holds a vector for none of the vocabulary's 5 words"):
            init_embedding(emb, str(f), vocab, freeze=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_forget_bias_init(bidirectional):
    model = build_model(20, ModelConfig(embedding_dim=8, hidden_dim=6, num_layers=2, forget_bias=1.0,
                                        bidirectional=bidirectional))
    biases = [p for n, p in model.named_parameters() if "bias_ih" in n or "bias_hh" in n]
    assert len(biases) == (8 if bidirectional else 4)
    for b in biases:
        assert torch.all(b[6:12] == 0.5) and not torch.all(b[:6] == 0.5)


def _ngram_model(pooling="last", seed=0):
    torch.manual_seed(seed)
    model = build_model(50, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1, pooling=pooling,
                                        ngram_max_n=3, ngram_buckets=97, ngram_weight=2.0))
    with torch.no_grad():  # trained-looking values: a zero weight would make the head's logit trivially invariant
        model.ngrams.weight.uniform_(-1, 1)
        model.ngrams.ratio.uniform_(-2, 2)
    return model.eval()


@pytest.mark.parametrize("pooling", ["last", "max"])
def test_ngram_head_padding_invariance(pooling):
    model = _ngram_model(pooling)
    short = torch.randint(2, 50, (1, 5))
    batch = torch.zeros(2, 30, dtype=torch.long)
    batch[0, :5], batch[1] = short, torch.randint(2, 50, (30,))
    alone = model(short, torch.tensor([5]), heads=True)
    together = model(batch, torch.tensor([5, 30]), heads=True)[:1]
    assert alone.shape == (1, 2) and torch.allclose(alone, together, atol=1e-6)
    # the model's logit is recurrent + ngram_weight x n-gram
    assert torch.allclose(model(short, torch.tensor([5])), alone[:, 0] + 2.0 * alone[:, 1], atol=1e-6)


def test_ngram_ids_count_and_hash_ngrams():
    from distsent.model import NgramHead

    head = NgramHead(50, ModelConfig(ngram_max_n=3, ngram_buckets=1000))
    ids, mask = head.ngram_ids(torch.tensor([[7, 8, 9, 7, 8, 0, 0]]), torch.tensor([5]))
    rows = ids[mask].tolist()
    assert len(rows) == 5 + 4 + 3  # words, bigrams, trigrams of the 5 real tokens; none touches the padding
    assert rows[:5] == [7, 8, 9, 7, 8] and all(50 <= r < 1050 for r in rows[5:])
    bigrams, trigrams = rows[5:9], rows[9:]
    assert bigrams[0] == bigrams[3] != bigrams[1]  # "7 8" twice maps to one row, "8 9" to another
    assert len(set(trigrams)) == 3 and not set(trigrams) & set(bigrams)
    # words alone are order-free; bigrams see the order
    swapped, _ = head.ngram_ids(torch.tensor([[8, 7, 9, 8, 7]]), torch.tensor([5]))
    assert sorted(swapped[0, :5].tolist()) == sorted(rows[:5]) and swapped[0, 5:9].tolist() != bigrams
    # binary features: each distinct word / n-gram once
    present, keep = head.present(torch.tensor([[7, 8, 9, 7, 8, 0, 0]]), torch.tensor([5]))
    assert sorted(present[keep].tolist()) == sorted(set(rows)) and keep.sum() == 3 + 3 + 3


def test_ngram_head_counts_each_ngram_once():
    model = _ngram_model()
    head = model.ngrams
    once = head(torch.tensor([[5, 6, 7, 5, 6, 7]]), torch.tensor([6]))
    # "5 6 7 5 6 7" and "5 6 7 5 6 7 5 6 7" hold the same distinct words, bigrams and trigrams
    twice = head(torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6, 7]]), torch.tensor([9]))
    assert torch.allclose(once, twice) and not torch.allclose(once, head(torch.tensor([[5, 6, 7]]), torch.tensor([3])))


def test_ngram_ratios_are_naive_bayes_log_count_ratios():
    from distsent.model import NgramHead

    head = NgramHead(10, ModelConfig(ngram_max_n=1))
    ids = torch.tensor([[2, 3, 2], [2, 4, 0], [5, 3, 0]])  # word 2 twice in review 0: counted once
    head.fit_ratios([(ids, torch.tensor([3, 2, 2]), torch.tensor([1.0, 1.0, 0.0]))])
    pos = torch.ones(10); pos[[2, 3, 4]] += torch.tensor([2.0, 1.0, 1.0])  # add-one smoothing
    neg = torch.ones(10); neg[[5, 3]] += 1.0
    assert torch.allclose(head.ratio, ((pos / pos.sum()) / (neg / neg.sum())).log())
    assert head.ratio[2] > 0 > head.ratio[5]


def test_empty_review_scores_the_ngram_bias():
    model = _ngram_model()
    with torch.no_grad():
        model.ngrams.bias.fill_(0.25)
    assert model.ngrams(torch.tensor([[0]]), torch.tensor([1])).item() == 0.25


def test_both_heads_learn_from_fitted_ratios():
    """Ratios fitted on a toy training set, then a few steps of the per-head losses: both heads learn the task."""
    torch.manual_seed(0)
    model = build_model(20, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1, pooling="max", ngram_max_n=2,
                                        ngram_buckets=64, ngram_weight=4.0))
    ids = torch.randint(4, 20, (64, 6))
    labels = (torch.arange(64) % 2).float()
    ids[:, 2] = torch.where(labels > 0, 2, 3)  # word 2 marks a positive review, word 3 a negative one
    lengths = torch.full((64,), 6)
    model.ngrams.fit_ratios([(ids, lengths, labels)])
    assert model.ngrams.ratio[2] > 1 > -1 > model.ngrams.ratio[3]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(30):
        heads = model(ids, lengths, heads=True)
        loss = F.binary_cross_entropy_with_logits(heads, labels.unsqueeze(1).expand_as(heads), reduction="none")
        opt.zero_grad()
        loss.sum(1).mean().backward()
        opt.step()
    model.eval()
    heads = model(ids, lengths, heads=True)
    assert ((heads > 0).float() == labels.unsqueeze(1)).all()  # each head alone, not only their sum
    assert torch.equal(model(ids, lengths), heads[:, 0] + 4.0 * heads[:, 1])


def _ensemble(num_classes, ngram_max_n, members=3, dropout=0.0):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1, bidirectional=True, pooling="max",
                      dropout=dropout, ngram_max_n=ngram_max_n, ngram_buckets=64, ngram_weight=0.5, members=members)
    model = build_model(40, cfg, num_classes)
    if model.ngrams is not None:  # give the n-gram head something to say
        with torch.no_grad():
            for t in (model.ngrams.weight, model.ngrams.ratio, model.ngrams.bias):
                t.normal_()
    return model


@pytest.mark.parametrize("num_classes, ngram_max_n", [(2, 0), (2, 2), (5, 0), (5, 2)])
def test_ensemble_predicts_the_mean_of_its_members_probabilities(num_classes, ngram_max_n):
    model = _ensemble(num_classes, ngram_max_n).eval()
    assert isinstance(model, Ensemble) and len(model.members) == 3
    ids, lengths = torch.randint(1, 40, (6, 9)), torch.tensor([9, 1, 4, 9, 2, 7])
    singles = [member_alone(model.state_dict(), model.cfg, 40, num_classes, i) for i in range(3)]
    alone = torch.stack([m.probabilities(m(ids, lengths)) for m in singles])
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # initialised independently
    logits = model(ids, lengths)
    assert logits.shape == ((6,) if num_classes == 2 else (6, num_classes))
    assert torch.allclose(model.probabilities(logits), alone.mean(0), atol=1e-6)
    heads = model(ids, lengths, heads=True)
    assert model.head_names == ("rnn0", "rnn1", "rnn2") + (("ngram",) if ngram_max_n else ())
    assert heads.shape[1] == len(model.head_names)
    assert torch.equal(model.combine(heads), logits)
    # a single model stays the tutorial's module, with the state-dict keys of earlier model folders
    single = build_model(40, ModelConfig(embedding_dim=8, hidden_dim=8, num_layers=1))
    assert isinstance(single, SentimentRNN) and "embedding.weight" in single.state_dict()


@pytest.mark.parametrize("num_classes", [2, 5])
def test_ensemble_of_confident_members_keeps_finite_logits(num_classes):
    """The mean probability is formed in log space: members sure at logit 40 (a sigmoid of exactly 1.0 in float32)
    or 100 apart give the logit of their mean, not inf or nan."""
    model = _ensemble(num_classes, ngram_max_n=0, members=2)
    if num_classes == 2:
        out = model.combine(torch.tensor([[40.0, 40.0], [-40.0, -40.0], [40.0, -40.0]]))
        assert torch.allclose(out, torch.tensor([40.0, -40.0, 0.0]), atol=1e-4)
    else:
        sure = torch.tensor([100.0, 0, 0, 0, 0])
        out = model.combine(torch.stack([sure, sure]).unsqueeze(0))
        assert torch.isfinite(out).all() and out.argmax() == 0
        assert torch.allclose(model.probabilities(out), F.softmax(sure.double(), -1), atol=1e-9)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_ensemble_members_learn_as_they_would_alone(num_classes):
    """The ensemble's summed per-head losses give each member, and the shared n-gram head, exactly the gradient of
    its own loss."""
    model = _ensemble(num_classes, ngram_max_n=2, members=2)
    ids, lengths = torch.randint(1, 40, (8, 9)), torch.tensor([9, 1, 4, 9, 2, 7, 3, 5])
    labels = (torch.arange(8) % num_classes).float()
    model.head_losses(model(ids, lengths, heads=True), labels, smoothing=0.1).sum().backward()
    parts = [(m, lambda m=m: m(ids, lengths, heads=True)) for m in model.members]
    parts.append((model.ngrams, lambda: model.ngrams(ids, lengths).unsqueeze(1)))
    for part, its_heads in parts:
        together = [p.grad.clone() for p in part.parameters()]
        part.zero_grad()
        model.head_losses(its_heads(), labels, smoothing=0.1).sum().backward()
        for a, b in zip(together, part.parameters()):
            assert torch.allclose(a, b.grad, atol=1e-6)


def test_ensemble_members_are_clipped_apart():
    """optim.clip_grad_norm clips each member (and the n-gram head) as it would be clipped alone; the norm reported
    is the largest."""
    from accelerate import Accelerator

    from distsent.model import clip_gradients

    model = _ensemble(5, ngram_max_n=2, members=2)
    for scale, part in zip((10.0, 0.5, 2.0), (*model.members, model.ngrams)):
        params = list(part.parameters())
        for p in params:
            p.grad = torch.ones_like(p)
        norm = torch.cat([p.grad.flatten() for p in params]).norm()
        for p in params:
            p.grad *= scale / norm
    norm = clip_gradients(Accelerator(cpu=True), model, 1.0)
    assert norm.item() == pytest.approx(10.0, rel=1e-5)
    for want, part in zip((1.0, 0.5, 1.0), (*model.members, model.ngrams)):
        got = torch.cat([p.grad.flatten() for p in part.parameters()]).norm().item()
        assert got == pytest.approx(want, rel=1e-4)
