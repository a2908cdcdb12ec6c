"""The tutorial's pipeline as written, kept as the benchmark baseline: per-item tokenization in the data loader,
post-padding to 256, a 2-layer LSTM 128/256 reading the last hidden state (after the padding), Adam 1e-3, clip 5,
batch 64, one process. Reads IMDB from local parquet; prints its preparation and per-epoch numbers as JSON lines."""
import argparse, json, re, time
from collections import Counter
import pyarrow.parquet as pq
import torch, torch.nn as nn, torch.optim as optim
from torch.utils.data import DataLoader

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True)
ap.add_argument("--epochs", type=int, default=5)
ap.add_argument("--train-limit", type=int, default=0)
ap.add_argument("--test-limit", type=int, default=0)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--max-steps", type=int, default=0)
ap.add_argument("--prep-only", action="store_true", help="time tokenize + vocabulary + numericalize of every review, then stop")
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="as the tutorial: the GPU if there is one")
a = ap.parse_args()
device = torch.device(a.device)
if a.threads: torch.set_num_threads(a.threads)
torch.manual_seed(0)

def load(split, limit):
    t = pq.read_table(f"{a.data}/{split}.parquet", columns=["text", "label"]).to_pydict()
    if limit:
        import random; idx = list(range(len(t["text"]))); random.Random(0).shuffle(idx); idx = idx[:limit]
        return [t["text"][i] for i in idx], [t["label"][i] for i in idx]
    return t["text"], t["label"]

def tokenize(text):
    return re.findall(r'\b\w+\b', text.lower())

def build_vocab(texts, min_freq=5):
    c = Counter()
    for t in texts: c.update(tokenize(t))
    v = {'<PAD>': 0, '<UNK>': 1}
    for w, f in c.items():
        if f >= min_freq: v[w] = len(v)
    return v

def text_to_sequence(text, vocab, max_len=256):
    s = [vocab.get(t, 1) for t in tokenize(text)][:max_len]
    return s + [0] * (max_len - len(s))

class DS(torch.utils.data.Dataset):
    def __init__(s, texts, labels, vocab): s.t, s.l, s.v = texts, labels, vocab
    def __len__(s): return len(s.t)
    def __getitem__(s, i):
        return torch.tensor(text_to_sequence(s.t[i], s.v), dtype=torch.long), torch.tensor(s.l[i], dtype=torch.float)

class SentimentLSTM(nn.Module):
    def __init__(s, V, e=128, h=256, n=2, d=0.5):
        super().__init__()
        s.embedding = nn.Embedding(V, e, padding_idx=0)
        s.lstm = nn.LSTM(e, h, num_layers=n, dropout=d if n > 1 else 0, batch_first=True)
        s.dropout = nn.Dropout(d); s.fc = nn.Linear(h, 1)
    def forward(s, x):
        _, (h, _) = s.lstm(s.embedding(x))
        return s.fc(s.dropout(h[-1])).squeeze(1)

t0 = time.time()
tr_x, tr_y = load("train", a.train_limit); te_x, te_y = load("test", a.test_limit)
vocab = build_vocab(tr_x)
print(json.dumps({"event": "prep", "seconds": round(time.time() - t0, 2), "vocab": len(vocab)}), flush=True)
if a.prep_only:  # what the pipeline redoes every epoch, done once here to time the whole preparation
    for t in tr_x + te_x: text_to_sequence(t, vocab)
    print(json.dumps({"event": "prep_all", "seconds": round(time.time() - t0, 2), "reviews": len(tr_x) + len(te_x)}), flush=True)
    raise SystemExit(0)
tl = DataLoader(DS(tr_x, tr_y, vocab), batch_size=64, shuffle=True)
vl = DataLoader(DS(te_x, te_y, vocab), batch_size=64)
model = SentimentLSTM(len(vocab)).to(device); crit = nn.BCEWithLogitsLoss(); opt = optim.Adam(model.parameters(), lr=1e-3)
step = 0
for ep in range(a.epochs):
    model.train(); t1 = time.time(); n = 0; correct = 0
    for x, y in tl:
        x, y = x.to(device), y.to(device)
        opt.zero_grad(); out = model(x); loss = crit(out, y); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()
        n += len(y); correct += ((out > 0) == (y > 0.5)).sum().item(); step += 1
        if a.max_steps and step >= a.max_steps: break
    if device.type == "cuda": torch.cuda.synchronize()
    tt = time.time() - t1
    model.eval(); c = 0; m = 0; t2 = time.time()
    with torch.no_grad():
        for x, y in vl:
            x, y = x.to(device), y.to(device)
            c += ((model(x) > 0) == (y > 0.5)).sum().item(); m += len(y)
    print(json.dumps({"event": "epoch", "epoch": ep + 1, "train_s": round(tt, 2), "train_samples_per_s": round(n / tt, 1),
                      "train_acc": round(correct / n, 4), "eval_s": round(time.time() - t2, 2), "test_acc": round(c / m, 4)}), flush=True)
    if a.max_steps and step >= a.max_steps: break
