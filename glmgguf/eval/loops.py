"""Loop detection on a generated token stream, and the n-gram diversity metrics.

A generation is a *loop* once one of these holds (token ids, and for (g) and (h) their text, checked after every
token):

- (a) periodic tail: the last `window` tokens (96) are exactly periodic with a period <= `max_period` (32);
- (b) repeated block: the output ends with a block of p <= `max_block` tokens (256) repeated
  `min_repeats` (20) times in a row, spanning >= `window` tokens (catches periods that (a) cannot see);
- (c) think restart: the text re-opens `<think>` after a `</think>`, or closes it a second time;
- (d) near repeat: >= `near_coverage` (95%) of the last `span(p)` tokens are copies, p the distance to the latest
  copy: inside a run of `near_ngram` (16) tokens that also occurred within the `near_reach` (1024) tokens before,
  single uncopied tokens (`near_gap`) between two copies counted as copied. `span(p) = min(span, max(488 - p,
  2p - 8))` (`span` 448): two copies of a long block, for a short one what a loop shows within 512 tokens, so a
  passage copied once in a 512-token stretch is not a loop. Catches counters, noisy tokens, repeated paragraphs and
  nested blocks that (a) and (b) miss; reported at the token where the coverage crossed the threshold;
- (e) edited repeat: the output copies, token by token, what it wrote `d` >= `edit_min_period` (16) tokens before,
  with at most `edit_rate` (5%) of the last `span(d)` tokens neither copied nor at least 16 tokens back. Copies are
  followed by an alignment that survives edits: each token is compared with the aligned token one and two
  iterations back (a token the previous iteration changed matches the one before; two back both by its own pointer
  and by the aligned token's own source), an inserted or deleted token re-aligns on a bigram within `edit_band` (3)
  positions, and a lost alignment is found again at one of the `edit_candidates` (4) latest earlier occurrences of
  the last `edit_ngram` (3) tokens: the one whose `edit_context` (32) tokens before agree most with the latest
  ones, so a block made of two similar records aligns with the block one iteration back, not with the other
  record. Catches the short blocks with dense edits that (d) misses (a token changed every 20-40 tokens, a name
  renamed in many places);
- (f) random edits: an edited repeat as in (e) with d <= `random_max_period` (160) and at most `random_rate` (15%)
  of the span edited, the edits at new places in every copy: at most `random_net_rate` (2.5%) of the span is left
  once the edits undone by the next copy are taken off (a token matching two iterations back but not one), and
  under `random_fixed` (35%) of the edits sit where the copy one iteration back was edited too (or has no aligned
  token). A template changes the same slot in every copy; a loop with a word swapped at random restores it in the
  next. Catches short blocks with one word swapped per copy, as many edits as templated records carry;
- (g) counted repeat (needs the tokens' text): rule (e)'s alignment where a number token one more than its aligned
  number one iteration back (two more, two back) counts as a copy, with at most `count_rate` (2%) of the span
  edited. Catches a counter in a fixed slot (`name36` -> `name37`, however often it recurs in a copy), the shape of
  a template for (e) and (f); records whose numbers change otherwise are left alone;
- (h) word repeat (needs the tokens' text): rules (e) and (f) on the words of the text (split at whitespace, which
  is dropped), spans measured in tokens as for (e): at most `word_rate` (6%) of the words in the span edited, or,
  for d <= `word_max_period` (160) tokens, at most `word_random_rate` (20%) with at most `word_net_rate` (8%) left
  once the undone edits are taken off and under `word_fixed` (70%) at places edited one copy back. A word swapped
  for one of another length is one edit here, where the token alignment loses itself (a swap inside a run of
  spaces, a long word replaced by a short one). The word alignment also re-aligns across one inserted word (a swap
  into a run of spaces inserts one; the next copy dropping it undoes the edit), and keeps a loop of at most
  `word_short_period` (64) tokens within 160 tokens when it re-anchors (re-anchoring on the last words, which hold
  the swap, finds an earlier copy with the same swap, many copies back).

(a) and (b) are the fast path for exact loops. The thresholds of (d)-(h) were chosen on the labelled set of
bench/loop_detection.py (crafted loop families against 512-token chunks of natural text of eight kinds):
16-token runs ignore the short shared fragments of templated text (JSON records, tables, unrolled asserts); a
fixed 256-token window flagged copy-pasted test methods and argparse records copied once, the span does not; for
(e), 5% edits is the largest rate with no false loop (6% flags JSON records of `numbers.Integral`'s operator
methods, which differ in the name, the line number and the operands' order); for (f), the loosest thresholds on
seeds 0-2 of the loops with no false loop (2.5% left over, 35% at edited places, d <= 160; 3%, or d <= 224, flag a
table of bisect cases and a run of filter asserts); for (g), half the largest rate with no false loop (4%; every
counter loop is found at 0%); for (h), those finding the most of the misses of seeds 0-2 with no false loop (a word
rate of 10% flags a font licence listing `"cmex7" is a Reserved Font Name for this Font Software.` line after line,
and the `os.spawn*` docstrings, each the one before with a word or two changed), then the re-alignment across an
inserted word, the random test limited to d <= 160 and the short loops' re-anchoring, each of which found misses
of seeds 0-5 and flagged no chunk (`word_short_period` raised to cover every loop flags six chunks,
`functools.total_ordering`'s generated methods and the `os.spawn*` docstrings among them).

*Borderline* (never a loop; kept apart): a periodic stretch of >= `borderline_span` tokens (48) holding >= 3
copies of its block, or a whole-output seq-rep-4 >= `borderline_seq_rep4` (0.5).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class LoopConfig:
    """Thresholds of the loop and borderline rules (see the module docstring)."""

    window: int = 96
    max_period: int = 32
    min_repeats: int = 20
    max_block: int = 256
    borderline_span: int = 48
    borderline_seq_rep4: float = 0.5
    near_ngram: int = 16
    span: int = 448
    near_coverage: float = 0.95
    near_gap: int = 1
    near_reach: int = 1024
    edit_min_period: int = 16
    edit_rate: float = 0.05
    edit_band: int = 3
    edit_ngram: int = 3
    edit_candidates: int = 4
    edit_context: int = 32
    random_rate: float = 0.15
    random_net_rate: float = 0.025
    random_fixed: float = 0.35
    random_max_period: int = 160
    count_rate: float = 0.02
    word_min_period: int = 4
    word_context: int = 12
    word_rate: float = 0.06
    word_random_rate: float = 0.2
    word_net_rate: float = 0.08
    word_fixed: float = 0.7
    word_max_period: int = 160
    word_short_period: int = 64

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Loop:
    """A confirmed loop: `kind` periodic | repeat | near_repeat | edited_repeat | random_edits | counted_repeat |
    word_repeat | think_restart, its period (tokens; for the rules (d)-(h) the distance to the copy), copies (for
    near_repeat: copied tokens / period; for (e)-(h): the span / period), where found."""

    kind: str
    period: int
    copies: float
    at_token: int


def distinct_n(tokens: Sequence[int], n: int = 4) -> float | None:
    """Unique n-grams / all n-grams (None when the output has fewer than n tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def span(period: int, config: LoopConfig) -> int:
    """Tokens a loop of `period` must fill for rules (d) and (e): two copies of a long block (2p - 8), for a short
    one what 512 tokens show after its first iteration (488 - p), at most `config.span`."""
    return min(config.span, max(488 - period, 2 * period - 8))


def random_edits(w: int, edits: int, undone: int, fixed: int, rate: float, net_rate: float, fixed_share: float) -> bool:
    """Rule (f)'s test of a span of w positions: few edits, fewer left once those the next copy undid are taken off,
    and few at a place the copy one iteration back had edited too."""
    return edits <= rate * w and edits - undone <= net_rate * w and fixed < fixed_share * edits


class NearRepeat:
    """Rule (d): the share of the last span(p) tokens that copy earlier text, updated per token in O(n-gram).

    A token is *copied* once an n-gram (`near_ngram` tokens) that holds it occurred before, at most `near_reach`
    tokens back; an uncopied gap of <= `near_gap` tokens between copied ones (a substituted token) counts too.
    """

    def __init__(self, config: LoopConfig) -> None:
        self.c = config
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index of its latest end
        self._copied = bytearray()  # per token: 1 when copied
        self._end = -1  # index of the latest copied token

    def feed(self, tokens: list[int]) -> Loop | None:
        """Account for tokens[-1] (the stream so far, [n]); a near_repeat Loop once the window is covered."""
        c, n = self.c, len(tokens) - 1
        self._copied.append(0)
        if n + 1 < c.near_ngram:
            return None
        gram = tuple(tokens[n - c.near_ngram + 1:])
        prev = self._last.get(gram)
        self._last[gram] = n
        if prev is None or n - prev > c.near_reach:
            return None
        lo = n - c.near_ngram + 1
        if 0 < lo - self._end - 1 <= c.near_gap:
            lo = self._end + 1
        for i in range(max(lo, self._end + 1), n + 1):
            self._copied[i] = 1
        self._end = n
        period = n - prev
        w = span(period, c)
        copied = self._copied.count(1, max(n + 1 - w, 0), n + 1)
        if n + 1 >= w and copied >= c.near_coverage * w:
            return Loop("near_repeat", period, round(copied / period, 2), n + 1)
        return None


class EditedRepeat:
    """Rules (e) and (f): the share of the last span(d) tokens that are not copies of the text `d` tokens back (one
    or two iterations), with an alignment that follows substitutions, small insertions and deletions, and how many of
    those edits the next copy undid or the copy before made too; O(band) per token.
    """

    def __init__(self, config: LoopConfig, min_period: int | None = None, context: int | None = None) -> None:
        self.c = config
        self.min_period = min_period or config.edit_min_period  # nearer copies count as edits
        self.context = context or config.edit_context  # items compared when choosing where to re-anchor
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> indices of its latest edit_candidates ends
        self._src: list[int] = []  # per token: its aligned position one iteration back (-1: none)
        self._bad = [0]  # prefix sums of tokens that are edits or closer than edit_min_period to their copy
        self._undone = [0]  # prefix sums of copied tokens that match two iterations back but not one (edits undone)
        self._fixed = [0]  # prefix sums of edits whose aligned token one iteration back is an edit too (or none)
        self._ptr = [-1, -1]  # aligned position of the latest token, one and two iterations back
        self._miss = [0, 0]  # consecutive mismatches of each pointer
        self._skipped = False  # the latest pointer-0 match skipped an item the copy had inserted (an edit undone)

    def _step(self, t: list[int], k: int) -> bool:
        """Advance pointer k to the latest token t[-1]; True when it matches there (directly or re-aligned)."""
        n, c = len(t) - 1, self._ptr[k] + 1
        if t[c] == t[n]:
            self._ptr[k], self._miss[k] = c, 0
            return True
        for q in (c + o * s for o in range(1, self.c.edit_band + 1) for s in (1, -1)):
            if 1 <= q < n and t[q] == t[n] and t[q - 1] == t[n - 1]:
                self._ptr[k], self._miss[k] = q, 0
                return True
        self._ptr[k], self._miss[k] = c, self._miss[k] + 1
        return False

    def _anchor(self, t: list[int], ends: list[int]) -> int:
        """The earlier end of the last n-gram (within reach) whose preceding `context` tokens agree most with
        the latest ones, the latest on a tie (-1: none): the block's own period, not a shorter internal one."""
        c, n = self.c, len(t) - 1
        best, anchor = -1, -1
        for q in reversed(ends):
            if not self._reachable(n, q):
                break
            agree = sum(t[n - j] == t[q - j] for j in range(c.edit_ngram, min(self.context, q + 1)))
            if agree > best:
                best, anchor = agree, q
        return anchor

    def _reachable(self, n: int, q: int) -> bool:
        """Whether item n may be re-anchored at an earlier end q."""
        return n - q <= self.c.near_reach

    def _realign(self, t: list[int]) -> None:
        """Re-anchor lost pointers: one iteration back at the best earlier occurrence of the last n-gram."""
        c, n = self.c, len(t) - 1
        prev = -1
        if n + 1 >= c.edit_ngram:
            ends = self._ends.setdefault(tuple(t[n - c.edit_ngram + 1:]), [])
            if self._ptr[0] < 0 or self._miss[0] >= 2:
                prev = self._anchor(t, ends)
            ends.append(n)
            del ends[:-c.edit_candidates]
        if prev >= 0:
            self._ptr[0], self._miss[0] = prev, 0
        if (self._ptr[1] < 0 or self._miss[1] >= 2) and self._ptr[0] >= 0 and self._src[self._ptr[0]] >= 0:
            self._ptr[1], self._miss[1] = self._src[self._ptr[0]], 0
        self._ptr = [p if n - p <= c.near_reach else -1 for p in self._ptr]

    def align(self, t: list[int]) -> int:
        """Account for t[-1] (the stream so far, [n]): follow the alignment and count its edits; the distance to the
        aligned position one iteration back (0: none)."""
        n = len(t) - 1
        self._skipped = False
        hit = direct = self._ptr[0] >= 0 and self._step(t, 0)
        direct = direct and not self._skipped
        if self._ptr[1] >= 0:
            hit = self._step(t, 1) or hit
        if not hit and self._ptr[0] >= 0:  # the aligned token's own source: two iterations back along the alignment
            two_back = self._src[self._ptr[0]]
            hit = two_back >= 0 and t[two_back] == t[n]
        self._realign(t)
        src = self._ptr[0]
        self._src.append(src)
        d = n - src if src >= 0 else 0
        bad = not hit or d < self.min_period
        self._bad.append(self._bad[-1] + bad)
        self._undone.append(self._undone[-1] + (not bad and not direct))
        self._fixed.append(self._fixed[-1] + (bad and (src < 0 or self._bad[src + 1] > self._bad[src])))
        return d if d >= self.min_period else 0

    @property
    def source(self) -> int:
        """The latest item's aligned position one iteration back (-1: none)."""
        return self._src[-1]

    def counts(self, w: int) -> tuple[int, int, int]:
        """(edits, edits undone by the next copy, edits where the copy one iteration back was edited) of the last
        w positions."""
        return (self._bad[-1] - self._bad[-1 - w], self._undone[-1] - self._undone[-1 - w],
                self._fixed[-1] - self._fixed[-1 - w])

    def feed(self, tokens: list[int]) -> Loop | None:
        """Account for tokens[-1]; an edited_repeat Loop once the span is mostly copies, or a random_edits Loop once
        its edits are mostly undone by the next copy."""
        c, n = self.c, len(tokens) - 1
        d = self.align(tokens)
        w = span(d, c)
        if not d or n + 1 < w:
            return None
        edits, undone, fixed = self.counts(w)
        if edits <= c.edit_rate * w:
            return Loop("edited_repeat", d, round(w / d, 2), n + 1)
        if d <= c.random_max_period and random_edits(w, edits, undone, fixed, c.random_rate, c.random_net_rate,
                                                     c.random_fixed):
            return Loop("random_edits", d, round(w / d, 2), n + 1)
        return None




class CountedRepeat(EditedRepeat):
    """Rule (g): rule (e)'s alignment where a number one more than its aligned number one iteration back (two more,
    two back) is a copy: a counter ("Attempt 17", `name36` -> `name37`) changing in every copy, however often it
    recurs in one. `values` maps the number tokens seen so far to their value."""

    def __init__(self, config: LoopConfig, values: dict[int, int]) -> None:
        super().__init__(config)
        self.values = values

    def _step(self, t: list[int], k: int) -> bool:
        c = self._ptr[k] + 1
        was, now = self.values.get(t[c]), self.values.get(t[-1])
        if was is not None and now is not None and now == was + k + 1:
            self._ptr[k], self._miss[k] = c, 0
            return True
        return super()._step(t, k)

    def feed(self, tokens: list[int]) -> Loop | None:
        """Account for tokens[-1]; a counted_repeat Loop once at most `count_rate` of the span are edits."""
        d = self.align(tokens)
        w = span(d, self.c)
        if d and len(tokens) >= w and self.counts(w)[0] <= self.c.count_rate * w:
            return Loop("counted_repeat", d, round(w / d, 2), len(tokens))
        return None


class WordAlignment(EditedRepeat):
    """Rule (h)'s alignment of words: rule (e)'s, which also re-aligns across one word inserted in this copy or in
    the copy (a swap into a run of spaces inserts a word; the copy's inserted word skipped is an edit undone), and
    which keeps the alignment of a short loop (at most `word_short_period` tokens back) within `word_max_period`
    tokens, where re-anchoring on the last words would follow a swapped word to an earlier copy with the same swap.
    `tok_end` is the tokens fed when each word ended."""

    def __init__(self, config: LoopConfig, tok_end: list[int]) -> None:
        super().__init__(config, min_period=config.word_min_period, context=config.word_context)
        self.tok_end = tok_end

    def _step(self, t: list[int], k: int) -> bool:
        c = self._ptr[k] + 1
        return super()._step(t, k) or self._skip(t, k, c)

    def _skip(self, t: list[int], k: int, c: int) -> bool:
        """Re-align pointer k, which expected t[c], across one inserted word: t[-1] matches near c with the word
        before t[-1]'s predecessor (a word inserted here) or before its own predecessor (a word the copy inserted)."""
        n = len(t) - 1
        for q in (c, c - 1, c + 1, c - 2, c + 2):
            if 2 <= q < n - 1 and t[q] == t[n] and (t[q - 1] == t[n - 2] or t[q - 2] == t[n - 1]):
                self._ptr[k], self._miss[k] = q, 0
                self._skipped = t[q - 2] == t[n - 1]
                return True
        return False

    def _reachable(self, n: int, q: int) -> bool:
        p, end, c = self._ptr[0], self.tok_end, self.c
        short = p >= 0 and end[n] - end[p] <= c.word_short_period
        return super()._reachable(n, q) and not (short and end[n] - end[q] > c.word_max_period)


class WordRepeat:
    """Rule (h): rules (e) and (f) on the words of the text (split at whitespace, whitespace dropped), where a word
    swapped for another is one edit whatever its tokens, and a run of spaces that a swap splits changes no word.
    Spans are measured in tokens as for (e): the words that end in the last span(d) tokens, d the tokens to the
    aligned word's copy."""

    def __init__(self, config: LoopConfig) -> None:
        self.c = config
        self._tok_end: list[int] = []  # per word: tokens fed when it ended
        self._align = WordAlignment(config, self._tok_end)
        self._ids: dict[str, int] = {}
        self._words: list[int] = []
        self._partial = ""

    def feed(self, piece: str, tokens: int) -> Loop | None:
        """Add the text of token number `tokens` (1-based); the loop confirmed at a word it completes, if any."""
        *words, self._partial = re.split(r"\s+", self._partial + piece)
        loop = None
        for word in filter(None, words):
            loop = loop or self._word(word, tokens)
        return loop

    def _word(self, word: str, tokens: int) -> Loop | None:
        c = self.c
        self._words.append(self._ids.setdefault(word, len(self._ids)))
        self._tok_end.append(tokens)
        if not self._align.align(self._words):
            return None
        d = tokens - self._tok_end[self._align.source]
        w_tokens = span(d, c)
        if tokens < w_tokens:
            return None
        w = len(self._words) - bisect_right(self._tok_end, tokens - w_tokens)
        edits, undone, fixed = self._align.counts(w)
        if edits <= c.word_rate * w or d <= c.word_max_period and random_edits(
                w, edits, undone, fixed, c.word_random_rate, c.word_net_rate, c.word_fixed):
            return Loop("word_repeat", d, round(w_tokens / d, 2), tokens)
        return None


class LoopDetector:
    """Feed tokens (and their text) as they stream; `loop` is set once a loop is confirmed."""

    def __init__(self, config: LoopConfig | None = None) -> None:
        self.config = config or LoopConfig()
        self._periods = np.arange(1, self.config.max_block + 1)
        self._text_tail = ""
        self._closed = 0
        self._reopened = False
        self.loop: Loop | None = None
        self._reset_tokens()

    def _reset_tokens(self) -> None:
        self.tokens: list[int] = []
        self._hist = np.zeros(1024, dtype=np.int64)
        # _run[p-1]: how many consecutive latest positions i satisfy t[i] == t[i-p]
        self._run = np.zeros(self.config.max_block, dtype=np.int64)
        self.borderline_stretch = False
        self._near = NearRepeat(self.config)
        self._edited = EditedRepeat(self.config)
        self._values: dict[int, int] = {}  # number tokens seen -> their value
        self._counted = CountedRepeat(self.config, self._values)
        self._words = WordRepeat(self.config)

    def rekey(self, tokens: Sequence[int], pieces: Sequence[str] | None = None) -> Loop | None:
        """Analyse the tokens again under other keys (e.g. their text instead of ids), with their text pieces if
        known; the text state stays."""
        think = self.loop if self.loop is not None and self.loop.kind == "think_restart" else None
        self.loop = None
        self._reset_tokens()
        for i, t in enumerate(tokens):
            self.feed(t, None if pieces is None else pieces[i])
        self.loop = self.loop or think
        return self.loop

    def feed(self, token: int, piece: str | None = None) -> Loop | None:
        """Add one token (and its text piece: rules (g) and (h) need it); returns the loop once confirmed (and keeps
        returning it)."""
        n = len(self.tokens)
        self.tokens.append(token)
        if n >= len(self._hist):
            self._hist = np.concatenate([self._hist, np.zeros_like(self._hist)])
        self._hist[n] = token
        k = min(n, len(self._run))
        if k:
            run = self._run[:k]
            same = self._hist[n - self._periods[:k]] == token
            run[:] = np.where(same, run + 1, 0)
            if self.loop is None:
                self._check(n + 1, run, self._periods[:k])
        if self.loop is None:
            self.loop = self._near.feed(self.tokens)
        if self.loop is None:
            self.loop = self._edited.feed(self.tokens)
        if piece is not None and self.loop is None:
            self._feed_text_rules(token, piece)
        return self.loop

    def _feed_text_rules(self, token: int, piece: str) -> None:
        """Rules (g) and (h), which know the token's text."""
        number = piece.strip()
        if number.isascii() and number.isdigit():
            self._values[token] = int(number)
        counted = self._counted.feed(self.tokens)
        words = self._words.feed(piece, len(self.tokens))
        self.loop = self.loop or counted or words

    def _check(self, length: int, run: np.ndarray, periods: np.ndarray) -> None:
        c = self.config
        span = run + periods  # the last `span` tokens are periodic with that period
        periodic = np.flatnonzero((span >= c.window) & (periods <= c.max_period))
        repeat = np.flatnonzero((span >= c.min_repeats * periods) & (span >= c.window))
        hits = [(int(periodic[0]), "periodic")] if periodic.size else []
        hits += [(int(repeat[0]), "repeat")] if repeat.size else []
        if hits:
            i, kind = min(hits)
            self.loop = Loop(kind, int(periods[i]), float(span[i] / periods[i]), length)
        elif not self.borderline_stretch:
            self.borderline_stretch = bool(np.any((span >= c.borderline_span) & (span >= 3 * periods)))

    def feed_text(self, text: str) -> Loop | None:
        """Add the text of the tokens fed so far; detects think restarts."""
        if not text:
            return self.loop
        window = self._text_tail + text
        start = 0
        while True:
            i_open, i_close = window.find(THINK_OPEN, start), window.find(THINK_CLOSE, start)
            hits = [(i, tag) for i, tag in ((i_open, THINK_OPEN), (i_close, THINK_CLOSE)) if i >= 0]
            if not hits:
                break
            i, tag = min(hits)
            if tag == THINK_CLOSE:
                self._closed += 1
            elif self._closed:
                self._reopened = True
            start = i + len(tag)
        keep = max(start, len(window) - len(THINK_CLOSE) + 1)
        self._text_tail = window[keep:]
        if self.loop is None and (self._closed >= 2 or self._reopened):
            self.loop = Loop("think_restart", 0, float(self._closed), len(self.tokens))
        return self.loop

    def borderline(self) -> bool:
        """Borderline verdict of the output so far (False once it is a loop)."""
        if self.loop is not None:
            return False
        d4 = distinct_n(self.tokens)
        return self.borderline_stretch or (d4 is not None and len(self.tokens) >= 64
                                           and 1 - d4 >= self.config.borderline_seq_rep4)


def detect(tokens: Sequence[int], config: LoopConfig | None = None,
           pieces: Sequence[str] | None = None) -> tuple[Loop | None, bool]:
    """Run the detector over a finished token sequence (and its text pieces, if known): (loop or None, borderline)."""
    det = LoopDetector(config)
    for i, t in enumerate(tokens):
        if det.feed(t, None if pieces is None else pieces[i]) is not None:
            break
    return det.loop, det.borderline()
