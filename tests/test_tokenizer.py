"""edgert.tokenizer against the Hugging Face `tokenizers` library (the reference).

The byte-level BPE tokenizers are trained here, offline, with the exact Qwen2 / Llama-3 /
GPT-2 pipeline configurations; the SentencePiece-style one is the real stories260K file.
Both edgert backends must give the reference's ids and text, and the pure-Python one must
do so with and without the optional `regex` module. Tests that need no reference still run
where `tokenizers` is not installed (Termux).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import edgert.tokenizer as T
from edgert.tokenizer import StreamDecoder, Tokenizer
from conftest import STORIES     # the shared/ copy or the identical bundled one


def _hf():
    return pytest.importorskip("tokenizers")


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's what they'll say; we're sure you've seen it.",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text if c.isalnum()]\n",
    "for (int i = 0; i < 1024; ++i) { total += values[i] * 3.14159; }  // accumulate\r\n",
    "Über die Brücke gehen Mädchen und Jungen; l'été à Paris, café crème, naïve façade, señor niño.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир! Москва 2024 год.",
    "我爱自然语言处理。今天天气很好，我们去公园散步吧！北京欢迎你。東京は日本の首都です。",
    "안녕하세요 세계. 한국어 텍스트도 포함합니다.",
    "مرحبا بالعالم. اللغة العربية جميلة جدا، وهذا نص للتجربة.",
    "नमस्ते दुनिया। हिंदी भाषा में यह एक परीक्षण वाक्य है।",
    "Emoji time 😀😃😄 👍🏽👍🏿 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷🇯🇵 — done!",
    "Numbers: 1234567890 3.1415926535 1,000,000 and 2^64 = 18446744073709551616.",
    "<think>\nLet me reason step by step about 17 * 23.\n</think>\nThe answer is 391.",
    "   indented line\n\n\n\ttabbed\tline  with   spaces   \n trailing    ",
] * 3
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "",
    " ",
    "Hello world",
    "Hello, world! It's a test. They'll go; WE'RE here; I'M ok; you'D; she'S; it'ſ; O'NEIL's",
    "The café in Zürich serves crème brûlée. naïve résumé coöperate Ærøskøbing",
    "Съешь же ещё этих мягких французских булок",
    "我爱自然语言处理，今天天气很好。東京タワー",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, यह हिंदी है।",
    "emoji 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷 and 🫠",
    "tabs\tand\ttabs\t\t\tend",
    "lines\n\nand\r\nwindows\r\n\r\nline\n   \n",
    "trailing spaces   ",
    "   leading spaces",
    "a  b   c    d     e",
    "12345678901234567890 3.14159 1,000,000 0x1F 1e-10 ١٢٣ ४२",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A: pass\n",
    "if (a && b || !c) { x += y->z; } // C++ <vector> ::std",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning here\n</think>\n\nanswer<|endoftext|>",
    "glued<|im_end|>text<|endoftext|><|endoftext|>  <think></think>",
    "mask: a   <mask> b<mask>c",
    "fim:<|fim|>   x <|fim|>\n\ny",
    "single [SW] word x[SW]y [SW]z (SW) [SW]",
    "normalized cafe\u0301! and café! and cafe\u0301!x",
    "decomposed e\u0301 vs composed é; Å vs A\u030a; ﬁ ligature; Ａ fullwidth",
    "whitespace kinds:\u00a0nbsp\u3000ideographic\u2003em\u0085nel\x1cfs\u2028ls end",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "supercalifragilistic unmergeableword supercalifragilistic!",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
    "x" * 300 + " " + "9" * 50 + " " + "!" * 40,
    "Mixed: English, 中文, Русский, العربية, हिन्दी, 日本語, 한국어 😀 123",
]
EXTRA_VOCAB = ["Ġsupercalifragilistic", "Ġunmergeableword", "supercalifragilistic"]


def _ws_chars():
    return [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x0b", "\x1c", "\u2028", "\u0085"]


def _fuzz_texts(n=120, seed=1234):
    rng = random.Random(seed)
    pool = (list("abcXYZ'sSſtTlLdDmM.,;:!?-_()[]{}<>\"/\\|@#$%^&*+=~`09")
            + ["é", "e\u0301", "ß", "ø", "Ж", "я", "中", "文", "の", "ア", "한", "ع", "ب", "न", "ि", "्",
               "😀", "👍", "🏽", "\u200d", "❤", "\ufe0f", "🇫", "🇷", "١", "४", "Ⅻ", "½", "²"]
            + _ws_chars() + SPECIALS + ["<think>", "</think>", "<mask>", "<|fim|>", "[SW]", "cafe\u0301!",
                                       "<s>", "</s>", "<unk>", "<|begin_of_text|>", "<0x41>"])
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


ALL_TEXTS = TEXTS + _fuzz_texts()


def _inject_vocab(tok, words):
    """Whole-word vocab entries that no merge produces: exercises ignore_merges."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for w in words:
        vocab.setdefault(w, len(vocab))
    return _hf().Tokenizer.from_str(json.dumps(data))


def _added_tokens(tok, bos=None):
    AddedToken = _hf().AddedToken
    if bos:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in bos])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_special_tokens([AddedToken("<mask>", special=True, normalized=False, lstrip=True)])
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False),
                    AddedToken("</think>\n\n", special=False, normalized=False),   # leftmost-longest
                    AddedToken("<|fim|>", special=False, normalized=False, rstrip=True),
                    AddedToken("[SW]", special=False, normalized=False, single_word=True),
                    AddedToken("cafe\u0301!", special=False, normalized=True)])


def _train(pre_tokenizer, normalizer, ignore_merges, vocab_size=900):
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _inject_vocab(tok, EXTRA_VOCAB)


def build_qwen2(path: Path, legacy_merges=True) -> Path:
    """Qwen2/2.5/3 and R1-Distill-Qwen: NFC, Split(regex, isolated) + ByteLevel(no regex)."""
    hf = _hf()
    pre_tokenizers, Regex = hf.pre_tokenizers, hf.Regex
    tok = _train(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]),
        hf.normalizers.NFC(), ignore_merges=False)
    tok.post_processor = hf.processors.ByteLevel(trim_offsets=False)
    _added_tokens(tok)
    path.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.to_str())
    if legacy_merges:   # older files store merges as "a b" strings
        data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def build_llama3(path: Path) -> Path:
    """Llama-3 and R1-Distill-Llama: no normalizer, ignore_merges, BOS via TemplateProcessing."""
    hf = _hf()
    pre_tokenizers, processors, Regex = hf.pre_tokenizers, hf.processors, hf.Regex
    tok = _train(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]),
        None, ignore_merges=True)
    _added_tokens(tok, bos=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def build_gpt2(path: Path) -> Path:
    """GPT-2 style: ByteLevel pre-tokenizer with its own regex and a prefix space."""
    hf = _hf()
    tok = _train(hf.pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True), None, ignore_merges=False)
    _added_tokens(tok, bos=["<s>", "</s>"])
    tok.post_processor = hf.processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def _stories_json() -> dict:
    return json.loads((STORIES / "tokenizer.json").read_text(encoding="utf-8"))


def build_metaspace(path: Path, scheme: str, split: bool) -> Path:
    """stories260K's vocab behind a Metaspace pre-tokenizer/decoder (older Llama-2 files)."""
    data = _stories_json()
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}
    data["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"},
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}]}
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {
        "qwen2": build_qwen2(root / "qwen2"),
        "llama3": build_llama3(root / "llama3"),
        "gpt2": build_gpt2(root / "gpt2"),
    }


@pytest.fixture(params=["regex", "stdlib"])
def engine(request, monkeypatch):
    """Run the pure-Python backend with the `regex` module and with the stdlib `re` only."""
    if request.param == "regex":
        if T._regex is None:
            pytest.skip("the optional `regex` module is not installed")
    else:
        monkeypatch.setattr(T, "_regex", None)
    return request.param


def _random_ids(ref, n=60, seed=7):
    rng = random.Random(seed)
    size = ref.get_vocab_size(with_added_tokens=True)
    return [[rng.randrange(size) for _ in range(rng.randint(1, 10))] for _ in range(n)]


def _check_against_reference(d: Path):
    ref = _hf().Tokenizer.from_file(str(d / "tokenizer.json"))
    ours = [Tokenizer.from_dir(d, backend="python"), Tokenizer.from_dir(d, backend="tokenizers")]
    assert [t.backend for t in ours] == ["python", "tokenizers"]
    for tok in ours:
        assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        assert tok.special_ids == {i for i, t in ref.get_added_tokens_decoder().items() if t.special}
        for i in range(tok.vocab_size + 2):
            assert tok.id_to_token(i) == ref.id_to_token(i), i
            if ref.id_to_token(i) is not None:
                assert tok.token_to_id(ref.id_to_token(i)) == ref.token_to_id(ref.id_to_token(i))
        assert tok.token_to_id("no such token \u2603") is None

    id_lists = []
    for text in ALL_TEXTS:
        for add in (True, False):
            want = ref.encode(text, add_special_tokens=add).ids
            for tok in ours:
                assert tok.encode(text, add_special_tokens=add) == want, (tok.backend, text, add)
        id_lists.append(ref.encode(text).ids)
    id_lists += _random_ids(ref)   # arbitrary ids: partial UTF-8, stray byte tokens, specials
    for ids in id_lists:
        for skip in (False, True):
            want = ref.decode(ids, skip_special_tokens=skip)
            for tok in ours:
                assert tok.decode(ids, skip_special_tokens=skip) == want, (tok.backend, ids, skip)
                stream = StreamDecoder(tok, skip_special_tokens=skip)
                pieces = [stream.push(i) for i in ids]
                assert "".join(pieces) + stream.flush() == want, (tok.backend, ids, pieces)


@pytest.mark.parametrize("name", ["qwen2", "llama3", "gpt2"])
def test_byte_level_bpe_matches_tokenizers(tok_dirs, name, engine):
    _check_against_reference(tok_dirs[name])


def test_stories260k_matches_tokenizers(engine):
    _check_against_reference(STORIES)


@pytest.mark.parametrize("scheme,split", [("first", True), ("always", False), ("never", True)])
def test_metaspace_variants_match_tokenizers(tmp_path, scheme, split):
    _check_against_reference(build_metaspace(tmp_path, scheme, split))


def test_ignore_merges_is_exercised(tok_dirs):
    """The injected whole word is one token only where ignore_merges is set (Llama-3)."""
    llama3 = Tokenizer.from_dir(tok_dirs["llama3"], backend="python")
    qwen2 = Tokenizer.from_dir(tok_dirs["qwen2"], backend="python")
    word_id = llama3.token_to_id("Ġsupercalifragilistic")
    assert word_id in llama3.encode(" supercalifragilistic", add_special_tokens=False)
    assert len(qwen2.encode(" supercalifragilistic")) > 1
    assert llama3.encode("x")[0] == llama3.token_to_id("<|begin_of_text|>")
    assert llama3.encode("x", add_special_tokens=False)[0] != llama3.token_to_id("<|begin_of_text|>")


def test_stream_decoder_holds_back_partial_characters():
    data = _stories_json()
    tok = Tokenizer.from_dir(STORIES, backend="python")
    ids = tok.encode("中", add_special_tokens=False)   # not in the 512 vocab: three <0x..> byte tokens
    assert [tok.id_to_token(i) for i in ids][-3:] == ["<0xE4>", "<0xB8>", "<0xAD>"]
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == [""] * len(ids)   # a byte run may still turn invalid
    assert stream.flush() == "中"
    ids = tok.encode("中a", add_special_tokens=False)
    assert [stream.push(i) for i in ids] == [""] * (len(ids) - 1) + ["中a"]
    assert stream.flush() == ""
    # the leading-space Strip applies to the first token of the whole text only
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert pieces[0] == "Once" and "".join(pieces) + stream.flush() == "Once upon a time"
    assert data["decoder"]["decoders"][-1]["type"] == "Strip"


def test_auto_backend_and_env(monkeypatch):
    _stories_json()
    d = STORIES
    monkeypatch.delenv("EDGERT_TOKENIZER", raising=False)
    try:
        import tokenizers  # noqa: F401
        expected = "tokenizers"
    except ImportError:
        expected = "python"
    assert Tokenizer.from_dir(d).backend == expected
    monkeypatch.setenv("EDGERT_TOKENIZER", "python")
    assert Tokenizer.from_dir(d).backend == "python"
    assert Tokenizer.from_dir(d / "tokenizer.json").backend == "python"
    with pytest.raises(ValueError, match="backend"):
        Tokenizer.from_dir(d, backend="sentencepiece")


def test_stdlib_regex_translation(monkeypatch):
    """Without `regex`, \\p{..} and \\s become explicit classes with Oniguruma's meaning."""
    monkeypatch.setattr(T, "_regex", None)
    rx = T._compile({"Regex": QWEN2_PATTERN})
    text = "It'S a\x1c\x1cb  x\u3000\u3000y 12 中文 ١٢"
    assert [m.group() for m in rx.finditer(text)] == [
        "It", "'S", " a", "\x1c\x1c", "b", " ", " x", "\u3000", "\u3000y", " ", "1", "2", " 中文", " ", "١", "٢"]
    assert [m.group() for m in T._compile({"Regex": r"[^\P{N}]+"}).finditer("ab12c٣")] == ["12", "٣"]
    with pytest.raises(ValueError, match="Han"):
        T._compile({"Regex": r"\p{Han}+"})


def _write(tmp_path: Path, data) -> Path:
    (tmp_path / "tokenizer.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return tmp_path


@pytest.mark.parametrize("backend", ["python", "tokenizers"])
def test_corrupt_json_raises_value_error(tmp_path, backend):
    if backend == "tokenizers":
        _hf()
    with pytest.raises(ValueError):
        Tokenizer.from_dir(_write(tmp_path, '{"model": {"type": "BPE", "vocab": {'), backend=backend)


@pytest.mark.parametrize("patch,feature", [
    ({"model": {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]]}}, "Unigram"),
    ({"model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0}}}, "WordPiece"),
    ({"pre_tokenizer": {"type": "BertPreTokenizer"}}, "BertPreTokenizer"),
    ({"normalizer": {"type": "BertNormalizer"}}, "BertNormalizer"),
    ({"decoder": {"type": "WordPiece", "prefix": "##"}}, "WordPiece"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}, "'b'"),
    ({"model": None}, "model"),
])
def test_unsupported_features_raise_value_error(tmp_path, patch, feature):
    base = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    with pytest.raises(ValueError, match=feature):
        Tokenizer.from_dir(_write(tmp_path, {**base, **patch}), backend="python")


@pytest.mark.parametrize("behavior", ["removed", "isolated", "merged_with_previous", "merged_with_next",
                                      "contiguous"])
@pytest.mark.parametrize("invert", [False, True])
def test_split_behaviors_match_tokenizers(behavior, invert, engine):
    pattern = r"\s+|\p{P}"
    hf = _hf()
    ref = hf.pre_tokenizers.Split(hf.Regex(pattern), behavior=behavior, invert=invert)
    ours = T._pre_tokenizer({"type": "Split", "pattern": {"Regex": pattern}, "behavior": behavior,
                             "invert": invert})
    for text in ["", "a", "Hello,  world!! How are\tyou?", "  ..x.. ", "a.b,c;d", "...", " 中文。テスト！ "]:
        assert [p for p, _ in ours([(text, True)])] == [p for p, _ in ref.pre_tokenize_str(text)], text
