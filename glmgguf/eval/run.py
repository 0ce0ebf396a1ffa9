"""Run probe prompts against llama-server: streamed raw sampling, loops stopped by the detector, a journal.

Token counts are exact: every request asks for `timings_per_token`, so each streamed chunk carries the server's
own count of generated tokens (`timings.predicted_n`); the final chunk's `usage.completion_tokens` wins when the
stream ends by itself. The detector sees token ids from the per-token `logprobs` (`top_logprobs: 1`); the
rare token whose text the server holds back (an incomplete UTF-8 character) is counted but not seen.

Speculative decoding (e.g. llama-server `--spec-type draft-mtp`): the same timings carry the server's running
counts of drafted and accepted draft tokens (`draft_n`, `draft_n_accepted`; absent while nothing was drafted),
kept per prompt as `draft_n` / `draft_accepted`. The pinned server sends no logprobs for the tokens it takes
from a verified draft, so from the first streamed piece without an id on, the detector keys every token of that
output by its text piece instead (`TokenKeys`; one piece per streamed token, as the ids were).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from glmgguf.eval.client import StreamError, stream_events
from glmgguf.eval.compare import OUTCOMES, summarize
from glmgguf.eval.loops import LoopConfig, LoopDetector, distinct_n
from glmgguf.eval.probes import EvalError, Prompt
from glmgguf.io.atomic import OutputExistsError, atomic_file

FORMAT = "glmgguf-eval-loops/1"
SAMPLER_TYPES: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "min_p": float,
                                  "repetition_penalty": float, "seed": int}
RAW = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": 0}
PRESETS = {
    "raw": RAW,  # the model's distribution untouched (llama-server's own defaults include min_p 0.05)
    "guarded": {**RAW, "min_p": 0.05, "repetition_penalty": 1.05},
    "greedy": {**RAW, "temperature": 0.0},
}


def sampler_settings(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A preset's sampler settings with `overrides` (None values ignored) applied and type-checked."""
    if preset not in PRESETS:
        raise EvalError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    out = dict(PRESETS[preset])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in SAMPLER_TYPES:
            raise EvalError(f"unknown sampler setting {key!r} (known: {', '.join(SAMPLER_TYPES)})")
        try:
            out[key] = SAMPLER_TYPES[key](value)
        except ValueError:
            raise EvalError(f"{key}={value!r} is not a {SAMPLER_TYPES[key].__name__}") from None
    return out


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; a journal only resumes a run with the same spec."""

    sampler: dict[str, Any]
    prompts: str  # the prompts file (or built-in suite) name
    prompts_sha256: str
    limit: int | None = None
    safety_cap: int = 16384
    system: str | None = None
    loop: LoopConfig = field(default_factory=LoopConfig)
    draft: dict[str, Any] | None = None  # speculative decoding of the server we started (eval.draft)
    lora: str | None = None  # the LoRA adapter GGUF (file name) the server we started applied

    def as_dict(self) -> dict[str, Any]:
        """The spec as JSON; `draft` and `lora` only when set (runs without them keep their old form)."""
        d = asdict(self)
        for key in ("draft", "lora"):
            if d[key] is None:
                del d[key]
        return d


def request_for(prompt: Prompt, spec: RunSpec) -> tuple[str, dict[str, Any]]:
    """(endpoint, JSON body): chat prompts to /v1/chat/completions, text prompts to /v1/completions."""
    s = spec.sampler
    body: dict[str, Any] = {"temperature": s["temperature"], "top_p": s["top_p"], "top_k": s["top_k"],
                            "min_p": s["min_p"], "repeat_penalty": s["repetition_penalty"], "seed": s["seed"],
                            "timings_per_token": True, "stream_options": {"include_usage": True}}
    if prompt.text is not None:
        return "/v1/completions", {**body, "prompt": prompt.text, "logprobs": 1}
    system = [{"role": "system", "content": spec.system}] if spec.system else []
    return "/v1/chat/completions", {**body, "messages": system + list(prompt.messages or []), "logprobs": True,
                                    "top_logprobs": 1, "reasoning_format": "none"}


class TokenKeys:
    """What the loop detector sees per token: its id while every token comes with one, else its text piece."""

    def __init__(self, det: LoopDetector) -> None:
        self.det = det
        self.pieces: list[str] = []
        self.by_text = False
        self._ids: dict[str, int] = {}

    def _key(self, piece: str) -> int:
        return self._ids.setdefault(piece, len(self._ids))

    def feed(self, choice: dict[str, Any], text: str) -> None:
        """One streamed choice: its logprob items (ids and pieces), else its text as one token."""
        items = (choice.get("logprobs") or {}).get("content") or []
        for item in items:
            piece = str(item.get("token", ""))
            self.pieces.append(piece)
            self.det.feed(self._key(piece) if self.by_text else int(item["id"]), piece)
        if text and not items:
            if not self.by_text:  # a token without an id: key the whole output by text from here on
                self.by_text = True
                self.det.rekey([self._key(p) for p in self.pieces], self.pieces)
            self.pieces.append(text)
            self.det.feed(self._key(text), text)


class Cancelled(Exception):
    """The run was interrupted while this prompt was generating."""


def generate(url: str, prompt: Prompt, spec: RunSpec, idle_timeout: float = 900.0,
             stop: threading.Event | None = None) -> dict[str, Any]:
    """One attempt at one prompt: stream until EOS, a confirmed loop or the safety cap. Raises StreamError."""
    path, payload = request_for(prompt, spec)
    det = LoopDetector(spec.loop)
    keys = TokenKeys(det)
    n_tokens, finish, tail = 0, None, ""
    drafted: int | None = None
    accepted: int | None = None
    t0 = time.perf_counter()
    events = stream_events(url, path, payload, idle_timeout)
    try:
        for event in events:
            if stop is not None and stop.is_set():
                raise Cancelled
            timings = event.get("timings") or {}
            n_tokens = timings.get("predicted_n", n_tokens)
            drafted = timings.get("draft_n", drafted)
            accepted = timings.get("draft_n_accepted", accepted)
            n_tokens = (event.get("usage") or {}).get("completion_tokens", n_tokens)
            for choice in event.get("choices", []):
                delta = choice.get("delta") or {}
                text = (delta.get("reasoning_content") or "") + (delta.get("content") or choice.get("text") or "")
                keys.feed(choice, text)
                det.feed_text(text)
                tail = (tail + text)[-500:]
                finish = choice.get("finish_reason") or finish
            if det.loop is not None or n_tokens >= spec.safety_cap:
                break
    finally:
        events.close()  # closing the connection cancels the generation on the server
    if det.loop is not None:
        outcome = "think_loop" if det.loop.kind == "think_restart" else "loop"
    elif n_tokens >= spec.safety_cap or finish == "length":
        outcome = "cap"  # our cap, or the server's context ran out
    elif finish == "stop":
        outcome = "eos"
    else:
        raise StreamError(f"the stream ended without a finish reason (finish_reason={finish!r})", retryable=True)
    borderline = det.borderline()
    cap_reason = ("looping" if borderline else "long") if outcome == "cap" else None
    return {"id": prompt.id, "source": prompt.source, "outcome": outcome, "borderline": borderline,
            "cap_reason": cap_reason,
            "loop": asdict(det.loop) if det.loop else None, "tokens": int(n_tokens),
            "distinct4": distinct_n(det.tokens), "seconds": round(time.perf_counter() - t0, 3),
            "finish_reason": finish, "error": None, "tail": tail, "draft_n": drafted, "draft_accepted": accepted,
            "token_keys": "text" if keys.by_text else "id"}


def probe(url: str, prompt: Prompt, spec: RunSpec, retries: int = 3, backoff: float = 2.0,
          idle_timeout: float = 900.0, stop: threading.Event | None = None) -> dict[str, Any]:
    """`generate` with retries (backoff, 2x, 4x ... seconds); a prompt that keeps failing gets outcome `error`."""
    stop = stop or threading.Event()
    for attempt in range(retries + 1):
        try:
            return {**generate(url, prompt, spec, idle_timeout, stop), "attempts": attempt + 1}
        except StreamError as e:
            error = str(e)
            if not e.retryable or attempt == retries or stop.wait(backoff * 2 ** attempt):
                break
    return {"id": prompt.id, "source": prompt.source, "outcome": "error", "borderline": False, "cap_reason": None,
            "loop": None,
            "tokens": 0, "distinct4": None, "seconds": 0.0, "finish_reason": None, "error": error[:500],
            "tail": "", "draft_n": None, "draft_accepted": None, "attempts": attempt + 1}


def journal_path(out: Path) -> Path:
    """Where a run's per-prompt results are appended as they finish (JSONL; first line the spec)."""
    return out.with_name(out.name + ".journal.jsonl")


def _read_journal(path: Path, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finished (non-error) results of an earlier, interrupted run with the same spec."""
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not header or header.get("spec") != spec:
        raise EvalError(f"{path} is the journal of a run with other settings or prompts; "
                        "remove it, or use --force to start over")
    done: dict[str, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off when the run was killed
        if rec.get("outcome") != "error":
            done[rec["id"]] = rec
    return done


def run_probes(url: str, prompts: list[Prompt], spec: RunSpec, out: Path, *, parallel: int = 1, retries: int = 3,
               backoff: float = 2.0, idle_timeout: float = 900.0, force: bool = False,
               progress: bool = True) -> dict[str, Any]:
    """Probe every prompt (resuming `out`'s journal), write `out` atomically, return the run document."""
    from tqdm import tqdm

    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to overwrite)")
    journal = journal_path(out)
    spec_dict = spec.as_dict()
    if force:
        journal.unlink(missing_ok=True)
    done = _read_journal(journal, spec_dict) if journal.exists() else {}
    resumed = len(done)
    if not journal.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text(json.dumps({"format": FORMAT, "spec": spec_dict}) + "\n")
    todo = [p for p in prompts if p.id not in done]
    stop = threading.Event()
    bar = tqdm(total=len(prompts), initial=resumed, desc=out.name, unit="prompt", disable=not progress)
    counts = {k: sum(r["outcome"] == k for r in done.values()) for k in OUTCOMES}
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        with journal.open("a") as jf:
            pending: set[Future] = {pool.submit(probe, url, p, spec, retries, backoff, idle_timeout, stop)
                                    for p in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    rec = fut.result()
                    jf.write(json.dumps(rec) + "\n")
                    jf.flush()
                    done[rec["id"]] = rec
                    counts[rec["outcome"]] += 1
                    bar.update(1)
                    bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=False)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    results = [done[p.id] for p in prompts]
    doc = {"format": FORMAT, "spec": spec_dict, "server": url, "resumed": resumed,
           "summary": summarize(results), "results": results}
    with atomic_file(out, force=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    journal.unlink()
    return doc
