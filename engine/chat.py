"""A chat session: turns, a KV cache reused across turns, an image-embedding cache, a context budget,
streaming and cancellation.

Reuse works on the token level: every turn the whole prompt is rebuilt from the turns (one source of truth:
the template), and only the suffix after the longest prefix shared with what the cache already holds is
computed. Regenerate and edit-last-turn therefore roll the cache back instead of recomputing, and the result
equals a full recompute by construction. Image-token positions are keyed by the image's content hash, so a
different image at the same place is never mistaken for a cached one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from .generation import Cancelled, Detokenizer, Sampler, SamplingParams, decode
from .processing import ImageSource, load_image
from .runtime import Runtime

USER, ASSISTANT = "User", "Assistant"
OVERFLOW_POLICIES = ("error", "drop_oldest")
MIN_ANSWER_ROOM = 64  # tokens a prompt must leave free to be answered at all


class ContextOverflow(ValueError):
    """The conversation does not fit the model's context window."""


def overflow_message(need: int, limit: int, reserve: int, images: int, image_tokens: int, earlier_turns: bool) -> str:
    """The one wording for a message that does not fit, with advice that fits the case: images only when
    there are some, a new chat only when there is history, shorter text when text takes much of the room."""
    text_tokens = need - reserve - images * image_tokens
    advice = []
    if images:
        advice.append("remove some images")
    if text_tokens > limit // 4 or not images:
        advice.append("shorten the text")
    if earlier_turns:
        advice.append("start a new chat")
    parts = f"{images} image(s) × {image_tokens} tokens, " if images else ""
    return (f"This message does not fit: the conversation would need {need:,} tokens ({parts}at least {reserve} kept "
            f"for the answer) but the model's context window is {limit} tokens. To send it, "
            f"{', '.join(advice[:-1]) + ' or ' if len(advice) > 1 else ''}{advice[-1]}.")


@dataclass
class Turn:
    role: str  # USER or ASSISTANT
    text: str
    images: list[str] = field(default_factory=list)  # content hashes, in placeholder order


@dataclass
class Budget:
    limit: int  # the model's context window
    used: int  # tokens the conversation takes now (prompt for the next answer)
    reserved: int  # room kept for the answer (max_new_tokens)
    image_tokens: int

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used - self.reserved)

    @property
    def images_left(self) -> int:
        return self.left // self.image_tokens


@dataclass
class Stats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # served from the KV cache
    new_images: int = 0  # encoded this turn (others came from the embedding cache)
    ttft: float = 0.0  # seconds to the first token
    tokens: int = 0
    decode_seconds: float = 0.0
    finish: str = ""  # "stop", "length", "cancelled"

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.tokens > 1 and self.decode_seconds > 0 else 0.0


def image_key(image: Image.Image) -> str:
    """Content hash of the decoded RGB pixels (two files with the same picture share one embedding)."""
    h = hashlib.sha256(f"{image.width}x{image.height}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ChatSession:
    def __init__(self, runtime: Runtime, system_prompt: str | None = None, *, overflow: str = "error",
                 context_limit: int | None = None, max_cached_images: int = 64):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}")
        self.runtime = runtime
        self.processor = runtime.processor
        self.system_prompt = runtime.processor.system_prompt if system_prompt is None else system_prompt
        self.overflow = overflow
        self.context_limit = context_limit or runtime.config.max_context
        self.turns: list[Turn] = []
        self.images: dict[str, Image.Image] = {}
        self._embeddings: dict[str, torch.Tensor] = {}  # hash -> [576, D]; insertion order = LRU order
        self._max_cached_images = max_cached_images
        self._cache = None
        self._cached_keys: list = []  # what the KV cache holds, position by position
        self._lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.last_stats = Stats()
        self.dropped_turns = 0

    # ------------------------------------------------------------------ turns
    def add_image(self, source: ImageSource) -> str:
        image = load_image(source)
        key = image_key(image)
        self.images.setdefault(key, image)
        return key

    def add_user(self, text: str, images: Sequence[ImageSource] = (), *, reserve: int = 512) -> Turn:
        """Append a user turn. Raises ContextOverflow (policy "error") before changing anything."""
        if self.turns and self.turns[-1].role == USER:
            raise ValueError("the last user turn has no answer yet; generate, or edit the last turn")
        keys = [self.add_image(img) for img in images]
        turn = Turn(USER, text, keys)
        self.turns = self._fit(self.turns + [turn], reserve)
        return turn

    def edit_last_user(self, text: str, images: Sequence[ImageSource] | None = None, *, reserve: int = 512) -> Turn:
        """Replace the last user turn (and drop its answer); the cache rolls back on the next answer."""
        index = self._last_user_index()
        keys = self.turns[index].images if images is None else [self.add_image(img) for img in images]
        turn = Turn(USER, text, keys)
        self.turns = self._fit(self.turns[:index] + [turn], reserve)
        return turn

    def drop_last_answer(self) -> None:
        """For regenerate: forget the last assistant turn; the next answer reuses the cache up to the prompt."""
        if self.turns and self.turns[-1].role == ASSISTANT:
            self.turns.pop()

    def reset(self) -> None:
        self.turns.clear()
        self._cache, self._cached_keys = None, []

    # ------------------------------------------------------------------ prompt and budget
    def _messages(self, turns: Sequence[Turn]) -> list[dict]:
        placeholder = self.processor.image_token
        messages = [{"role": t.role, "content": placeholder * len(t.images) + t.text} for t in turns]
        if not turns or turns[-1].role == USER:
            messages.append({"role": ASSISTANT, "content": ""})
        return messages

    def _encode(self, turns: Sequence[Turn]) -> tuple[torch.Tensor, list]:
        """Token ids and per-position keys: the token id, or (image hash, row) on image slots."""
        _, ids = self.processor.encode(self._messages(turns), self.system_prompt)
        keys: list = ids.tolist()
        n = self.processor.num_image_tokens
        hashes = [h for t in turns for h in t.images]
        # Image spans are runs of exactly n image ids; consecutive images form one long run.
        starts = []
        i = 0
        while i < len(keys):
            if keys[i] == self.processor.image_id:
                starts.append(i)
                i += n
            else:
                i += 1
        if len(starts) != len(hashes):
            raise ValueError(f"the prompt has {len(starts)} image slots for {len(hashes)} images")
        for start, h in zip(starts, hashes):
            keys[start:start + n] = [(h, k) for k in range(n)]
        return ids, keys

    def budget(self, reserve: int = 512) -> Budget:
        used = len(self._encode(self.turns)[0]) if self.turns else len(self._encode([Turn(USER, "")])[0])
        return Budget(self.context_limit, used, reserve, self.processor.num_image_tokens)

    def _fit(self, turns: list[Turn], reserve: int) -> list[Turn]:
        """`turns` if they fit the context window with `reserve` tokens left for the answer; under
        "drop_oldest", without their oldest whole turns. Never cuts inside a turn (or an image)."""
        def needed(ts):
            return len(self._encode(ts)[0]) + reserve
        need = needed(turns)
        if need <= self.context_limit:
            return turns
        if self.overflow == "drop_oldest":
            kept = list(turns)
            while len(kept) > 1 and need > self.context_limit:
                dropped = 2 if len(kept) > 2 and kept[1].role == ASSISTANT else 1
                del kept[:dropped]
                self.dropped_turns += dropped
                need = needed(kept)
            if need <= self.context_limit:
                return kept
        raise ContextOverflow(overflow_message(need, self.context_limit, reserve, sum(len(t.images) for t in turns),
                                               self.processor.num_image_tokens, earlier_turns=len(turns) > 1))

    def _last_user_index(self) -> int:
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i].role == USER:
                return i
        raise ValueError("there is no user turn yet")

    # ------------------------------------------------------------------ images
    def _embeddings_for(self, hashes: Sequence[str]) -> int:
        """Encode the images not in the embedding cache, in one batch; returns how many were encoded."""
        missing = [h for h in dict.fromkeys(hashes) if h not in self._embeddings]
        if missing:
            pixels = self.processor.image_processor([self.images[h] for h in missing])
            embeds = self.runtime.model.encode_images(pixels)
            for h, e in zip(missing, embeds):
                self._embeddings[h] = e
        for h in hashes:  # LRU: touched entries move to the end
            self._embeddings[h] = self._embeddings.pop(h)
        while len(self._embeddings) > self._max_cached_images:
            self._embeddings.pop(next(iter(self._embeddings)))
        return len(missing)

    # ------------------------------------------------------------------ generation
    def _new_cache(self):
        return self.runtime.model.language_model.new_cache()

    @torch.inference_mode()
    def _prefill(self, ids: torch.Tensor, keys: list) -> torch.Tensor:
        """Bring the KV cache to `keys`, computing only what differs; returns next-token logits [V]."""
        model = self.runtime.model
        common = 0
        limit = min(len(keys) - 1, len(self._cached_keys))  # at least one token must run to get logits
        while common < limit and keys[common] == self._cached_keys[common]:
            common += 1
        if self._cache is None:
            self._cache, common = self._new_cache(), 0
        elif common < self._cache.get_seq_length():
            self._cache.crop(common)
        self._cached_keys = self._cached_keys[:common]

        new_keys = keys[common:]
        image_hashes = list(dict.fromkeys(k[0] for k in new_keys if isinstance(k, tuple)))
        self.last_stats.new_images = self._embeddings_for(image_hashes)
        new_ids = ids[common:][None].to(model.device)
        is_image = torch.tensor([isinstance(k, tuple) for k in new_keys])[None].to(model.device)
        rows = None
        if is_image.any():
            rows = torch.stack([self._embeddings[k[0]][k[1]] for k in new_keys if isinstance(k, tuple)])
        embeds = model.embed(new_ids, is_image, rows)
        positions = torch.arange(common, len(keys), device=model.device)[None]
        out = model(input_ids=new_ids, inputs_embeds=embeds, position_ids=positions, cache=self._cache,
                    use_cache=True, logits_to_keep=1)
        self._cached_keys = list(keys)
        self.last_stats.prompt_tokens = len(keys)
        self.last_stats.reused_tokens = common
        return out.logits[0, -1]

    def stream(self, params: SamplingParams | None = None, cancel: threading.Event | None = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Answer the last user turn, yielding text pieces. The answer (partial if stopped) is appended as an
        assistant turn when the generator ends, however it ends. `stop`: strings that end the answer besides the
        template's own (as OpenAI's `stop`: the answer is cut before one, and the finish is "stop")."""
        params = params or SamplingParams()
        if not self.turns or self.turns[-1].role != USER:
            raise ValueError("add a user turn first")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this session is already generating")
        try:
            # Room for at least a short answer; a longer max_new_tokens is capped to the window below.
            self.turns = self._fit(self.turns, min(params.max_new_tokens, MIN_ANSWER_ROOM))
        except BaseException:
            self._lock.release()
            raise
        cancel = cancel or self.cancel_event
        cancel.clear()
        tokenizer = self.processor.tokenizer
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stop_strings = [*self.processor.template.stop_str, *(s for s in stop if s)]
        longest_stop = max(map(len, stop_strings), default=0)
        detokenizer = Detokenizer(tokenizer)
        text = ""  # the answer decoded so far (cut at a stop string once one appears)
        emitted = 0  # how much of `text` has been yielded
        self.last_stats = stats = Stats()
        start = time.perf_counter()
        try:
            ids, keys = self._encode(self.turns)
            params = params.with_(max_new_tokens=min(params.max_new_tokens, self.context_limit - len(ids)))
            logits = self._prefill(ids, keys)
            stats.finish = "length"
            tokens = decode(self.runtime.model, self._cache, logits, Sampler(params), history=ids,
                            stop_ids=stop_ids, cancel=cancel)
            cut = None
            with torch.inference_mode():
                for token in tokens:
                    self._cached_keys.append(token)
                    if stats.tokens == 0:
                        stats.ttft = time.perf_counter() - start
                    stats.tokens += 1
                    piece = detokenizer.add(token)
                    if not piece:
                        continue
                    # A stop string not found before must end inside the new piece.
                    searched_from = max(0, len(text) - longest_stop + 1)
                    text += piece
                    cut = _first_stop(text, stop_strings, searched_from)
                    if cut is not None:
                        text, stats.finish = text[:cut], "stop"
                    safe = len(text) - _partial_stop(text, stop_strings)
                    if safe > emitted:
                        yield text[emitted:safe]
                        emitted = safe
                    if cut is not None:
                        break
                else:
                    if stats.tokens < params.max_new_tokens:
                        stats.finish = "stop"
            if cut is None:
                text = _strip_stop(text + detokenizer.flush(), stop_strings)
            if len(text) > emitted:
                yield text[emitted:]
                emitted = len(text)
        except Cancelled:
            stats.finish = "cancelled"
        finally:
            stats.decode_seconds = time.perf_counter() - start - stats.ttft
            self.turns.append(Turn(ASSISTANT, text[:emitted].strip()))
            self._lock.release()

    def cancel(self) -> None:
        self.cancel_event.set()

    def answer(self, params: SamplingParams | None = None, stop: Sequence[str] = ()) -> str:
        return "".join(self.stream(params, stop=stop))


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string ("Us" of "User:"): held back."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


def _strip_stop(text: str, stops: Sequence[str]) -> str:
    cut = _first_stop(text, stops)
    return (text if cut is None else text[:cut]).rstrip("\ufffd")
