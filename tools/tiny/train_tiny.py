"""Train a tiny GPT-2 on Python's own documentation, on a CPU, and save it where picogpt can load it.

    python tools/tiny/train_tiny.py [--minutes 18] [--out picogpt/tiny] [--seed 0]

Corpus: tiny_corpus.py (the interpreter's help topics and standard-library docstrings, a fixed tenth
held out). Tokenizer: a byte-level BPE of 4096 tokens trained on the training documents, written as
GPT-2 style vocab.json + merges.txt and read back through picogpt's own tokenizer, which then
tokenizes everything, so training and inference see the same ids. Model: GPT-2's architecture
(transformers.GPT2LMHeadModel), 4 layers, 4 heads, 256 wide, 256 positions, about 4.3M parameters.
Saved as config.json + float16 model.safetensors + vocab.json + merges.txt (about 9 MB).

The budget is wall-clock: the learning rate (linear warmup, then cosine decay to a tenth) is a
function of the elapsed fraction of --minutes, so the schedule always runs to its end however fast
the machine is, and training stops when the time is up. Seeds fix the initial weights and the batch
order, but how many steps fit in the budget depends on the machine's load, so two runs are not
bit-identical. At the end it reports the held-out perplexity as computed by picogpt itself on the
saved float16 weights, and a greedy and a sampled continuation.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from tiny_corpus import ENDOFTEXT, corpus
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils.logging import disable_progress_bar

import picogpt
from picogpt.tokenizer import bytes_to_unicode, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 4096  # 256 bytes + 3839 merges + <|endoftext|>
N_CTX = 256
BATCH = 16  # windows of N_CTX tokens per step
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 0.05  # warmup is a fraction of the budget
EVAL_WINDOWS = 32  # held-out windows scored at each log line (the final report uses all of them)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=18, help="wall-clock training budget (default: %(default)s)")
    p.add_argument("--out", default=os.path.join(REPO, "picogpt", "tiny"), help="output folder (default: picogpt/tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads (default: %(default)s; 1 can be faster on a busy machine)"
    )
    return p.parse_args()


# ---- tokenizer ----------------------------------------------------------------------------------


def train_bpe(docs):
    """GPT-2 style merges learned from `docs`: a list of (first, second) pairs in priority order."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False
    )  # GPT-2's split, bytes as printable characters
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]  # older tokenizers: "a b"


def write_gpt2_tokenizer(merges, folder):
    """vocab.json + merges.txt in GPT-2's id convention, which picogpt requires.

    tokenizers numbers <|endoftext|> first; GPT-2 (and so tiktoken's ranks) numbers the 256 bytes
    0..255, then merge n gives id 256 + n, then <|endoftext|> last. We rebuild the ids from the merges.
    """
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    kept = []
    for first, second in merges:
        if first + second not in vocab:  # BPE training can in principle reach one token twice: keep the first
            vocab[first + second] = len(vocab)
            kept.append((first, second))
    vocab[ENDOFTEXT] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))


def build_tokenizer(train_docs, folder):
    """Train, write and reload the tokenizer; the tiktoken Encoding picogpt will use at inference."""
    write_gpt2_tokenizer(train_bpe(train_docs), folder)
    enc = load_tokenizer(folder)  # raises if the ids do not follow the merges
    assert enc.n_vocab <= VOCAB_SIZE and enc.eot_token == enc.n_vocab - 1, (enc.n_vocab, enc.eot_token)
    bad = [d for d in train_docs if enc.decode(enc.encode_ordinary(d)) != d]
    assert not bad, f"the tokenizer does not round-trip {len(bad)} documents"
    return enc


def token_stream(enc, docs):
    """All documents as one uint16 array of ids, each document preceded by <|endoftext|>.

    The same ids as picogpt.tokenizer.encode(enc, "".join(ENDOFTEXT + d for d in docs)).
    """
    ids = []
    for doc in enc.encode_ordinary_batch(docs):
        ids += [enc.eot_token, *doc]
    return np.array(ids, dtype=np.uint16)


# ---- training -----------------------------------------------------------------------------------


def make_model(eot):
    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=N_CTX,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=eot,
        eos_token_id=eot,
        tie_word_embeddings=True,
        # Dropout stays at GPT-2's 0.1: the training stream is small enough (~0.3M tokens) to be seen many times.
    )
    return GPT2LMHeadModel(config)


def make_optimizer(model):
    # Weight decay on matrices and embeddings only, never on biases and layer-norm gains (as nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def lr_at(fraction):
    """Learning rate at this fraction of the time budget: linear warmup, then cosine down to MIN_LR."""
    if fraction < WARMUP:
        return LR * (fraction + 1e-3) / WARMUP
    progress = min(1.0, (fraction - WARMUP) / (1 - WARMUP))
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def get_batch(data, rng):
    """BATCH random windows: inputs and their next-token targets, [BATCH, N_CTX] each."""
    starts = rng.integers(0, len(data) - N_CTX - 1, BATCH)
    w = torch.from_numpy(np.stack([data[s : s + N_CTX + 1] for s in starts]).astype(np.int64))
    return w[:, :-1], w[:, 1:]


def windows(data):
    """Non-overlapping windows covering `data`: each predicts N_CTX tokens (fewer in the last) from the ones before."""
    return [data[s : s + N_CTX + 1] for s in range(0, len(data) - 1, N_CTX)]


def loss_of(model, x, y):
    logits = model(x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def heldout_loss(model, heldout):
    """Mean next-token loss (nats) over evenly spaced held-out windows, all of full length."""
    model.eval()
    full = [w for w in windows(heldout) if len(w) == N_CTX + 1]
    picked = np.linspace(0, len(full) - 1, EVAL_WINDOWS).round().astype(int)
    w = torch.from_numpy(np.stack([full[i] for i in picked]).astype(np.int64))
    loss = loss_of(model, w[:, :-1], w[:, 1:]).item()
    model.train()
    return loss


def train(model, data, heldout, minutes, seed):
    """Train until the time budget is spent; log train and held-out loss about every minute."""
    rng = np.random.default_rng(seed)
    optimizer = make_optimizer(model)
    budget = 60 * minutes
    log_every = min(60.0, budget / 4)
    model.train()
    start = last_log = time.perf_counter()
    step, losses = 0, []
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(elapsed / budget)
        x, y = get_batch(data, rng)
        loss = loss_of(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        now = time.perf_counter()
        if now - last_log >= log_every or now - start >= budget:
            print(
                f"step {step:5d}  {(now - start) / 60:5.1f} min  lr {lr_at(min(1.0, elapsed / budget)):.2e}  "
                f"train {np.mean(losses):.3f}  held-out {heldout_loss(model, heldout):.3f}  "
                f"({1000 * (now - start) / step:.0f} ms/step, {step * BATCH * N_CTX / len(data):.1f} epochs)",
                flush=True,
            )
            last_log, losses = time.perf_counter(), []
    return step


# ---- saving and checking with picogpt -----------------------------------------------------------


def save(model, folder):
    """config.json + float16 model.safetensors next to the tokenizer files, and nothing else (leaves `model` in float16)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.half().save_pretrained(tmp)  # also writes generation_config.json, which picogpt does not need
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(
                os.path.join(tmp, name), os.path.join(folder, name)
            )  # not copy: keep umask permissions, not 0600


def picogpt_perplexity(model, ids):
    """exp(mean next-token NLL) over non-overlapping windows, each token predicted once."""
    n_head = model.config["n_head"]
    nll, count = 0.0, 0
    for w in windows(ids):
        logits = picogpt.gpt2(w[:-1].tolist(), **model.params, n_head=n_head)  # [n, n_vocab]
        top = logits.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll += float((log_z - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return math.exp(nll / count)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    os.makedirs(args.out, exist_ok=True)

    train_docs, heldout_docs = corpus()
    enc = build_tokenizer(train_docs, args.out)
    data, heldout = token_stream(enc, train_docs), token_stream(enc, heldout_docs)
    for name, docs, ids in (("train", train_docs, data), ("held-out", heldout_docs, heldout)):
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)):,} characters, {len(ids):,} tokens")

    model = make_model(enc.eot_token)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; training for {args.minutes:g} minutes")
    steps = train(model, data, heldout, args.minutes, args.seed)
    save(model, args.out)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"{steps} steps; saved to {args.out} (model.safetensors {size / 1e6:.1f} MB)")

    tiny = picogpt.load(args.out, backend="numpy")
    print(f"held-out perplexity (picogpt, float16 weights): {picogpt_perplexity(tiny, heldout):.2f}")
    for label, options in (
        ("greedy", dict(temperature=0)),
        ("sampled", dict(temperature=0.8, top_k=40, seed=args.seed)),
    ):
        print(f"--- {label}:\nThe list{tiny.generate('The list', max_new_tokens=60, **options)}")


if __name__ == "__main__":
    main()
