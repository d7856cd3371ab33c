"""Generation engine behind the server: one local model, continuous (iteration-level) batching.

A single worker thread per model owns the model and runs one loop; every turn of it is one decoding
step for the whole running batch:

1. new requests are taken from the inbox; cancelled ones (client gone, timeout) leave the batch;
2. free batch slots (``max_batch_size`` rows) are filled from the waiting requests, one row per
   request in turn, requests with no running row first; a request's ``prompt × n`` rows are thus
   split over as many steps as the slots allow. When the batch is full and a request has no row
   running, the newest row of the request holding the most rows is *preempted*: it leaves the batch
   keeping its tokens, and later rejoins by recomputing its context (prompt + tokens so far), so a
   short request never waits for a long many-row generation to end;
3. joining rows are prefilled together (left-padded, one forward pass) and their KV cache is merged
   into the running batch's;
4. every running row samples its next token from its logits (its own temperature, top-p, seed,
   stop strings, budget); finished and failed rows leave;
5. one forward pass over the remaining rows with their last token gives the next logits.

The KV cache is one transformers ``DynamicCache`` for the batch, **left-padded with per-row
positions**: a row's keys sit at the right end of the time axis, an attention mask hides the padding
on its left, and ``position_ids`` are each row's own token count, so a row's tokens do not depend on
its batch mates. Joining rows are padded on the left to the batch's cache length (or the batch to
theirs); when rows leave, columns that are padding for every remaining row are cut off, so the cache
is as long as the longest running context.

A failure while prefilling a group of requests is retried request by request, so only the request
that fails gets an error; an error while sampling a row fails only that row's request. Tokens are
pushed to the caller's asyncio loop as they are produced, so streaming and non-streaming requests
share one code path.

A model that takes images (a LLaVA-style directory, ``detect_modalities`` says ``vision``) loads with
``AutoModelForImageTextToText`` and its ``AutoProcessor``; a chat request's images are preprocessed with
the prompt (:meth:`Engine.image_chat_prompt`) and their ``pixel_values`` go into the prefill of each of
its rows (again when a preempted row rejoins); decoding steps need only the new tokens.

A model that takes audio (the omni stage's Qwen2-Audio sibling, ``detect_modalities`` says ``audio``)
loads with ``AutoModelForSeq2SeqLM`` (the Auto class transformers registers ``qwen2_audio`` under) and its
``AutoProcessor``; a chat request's clips go through the processor with the prompt
(:meth:`Engine.audio_chat_prompt`) and their ``input_features`` join the prefill the same way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexus_core.errors import InputError
from nexus_core.models.io import from_pretrained_safe, load_causal_lm
from nexus_core.train.audio import AudioSpec, audio_spec
from nexus_core.train.modalities import detect_modalities

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Per-request decoding parameters (OpenAI semantics: temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # vLLM extension: always generate max_tokens (benchmarks)


@dataclass
class GenRequest:
    """One API request: one or more prompts (token ids), each generated ``n`` times.

    Events go to ``events`` on the caller's loop: ``("token", index, text, [logprob entries])``,
    ``("done", index, finish_reason, prompt_tokens, completion_tokens)``, ``("error", message)``.
    Setting ``cancelled`` makes its rows leave the batch at the next decoding step.
    """

    prompts: list[list[int]]
    sampling: Sampling
    n: int = 1
    pixel_values: Any = None  # the images of prompts[0] (chat requests with image parts), preprocessed
    audio_features: Any = None  # the clips of prompts[0]: {"input_features", "feature_attention_mask"}
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    started: bool = False  # a row of it has joined the batch (it no longer counts as queued)
    waiting: deque = field(default_factory=deque)  # rows not in the batch (not yet, or preempted)
    running: int = 0  # rows in the batch now
    checked_at: float = 0.0  # when the server last looked whether the client is still connected

    def emit(self, event: tuple) -> None:
        """Hand an event to the caller's loop from the worker thread."""
        if self.loop is not None and self.events is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    req: GenRequest
    index: int
    prompt: list[int]
    generator: Any = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already emitted
    pending_lp: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    joined: int = 0  # decoding step at which it (last) joined the batch


class Engine:
    """One served model: its tokenizer, a request inbox and the continuous-batching worker thread."""

    def __init__(self, name: str, path: str | Path, *, max_batch_size: int = 16, batch_wait_s: float = 0.005,
                 dtype: str = "float32", on_batch: Any = None, draft_path: str | Path | None = None,
                 device: str | None = None):
        import torch

        self.name = name
        self.path = str(path)
        self.vision = (Path(path) / "config.json").is_file() and "vision" in detect_modalities(path)
        self.processor: Any = None
        # what the model's clips must be (its rate, its encoder's window); None: it takes no audio
        self.audio: AudioSpec | None = None
        if (Path(path) / "config.json").is_file() and "audio" in detect_modalities(path):
            from transformers import AutoModelForSeq2SeqLM, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(str(path))
            self.model = from_pretrained_safe(AutoModelForSeq2SeqLM, path, dtype=getattr(torch, dtype)).eval()
            self.tokenizer = self.processor.tokenizer
            self.audio = audio_spec(path, float("inf"))
            if draft_path:
                raise InputError(f"draft model {draft_path}: speculative decoding is not built for audio models")
        elif self.vision:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(str(path))
            self.model = from_pretrained_safe(AutoModelForImageTextToText, path, dtype=getattr(torch, dtype)).eval()
            self.tokenizer = self.processor.tokenizer
            if draft_path:
                raise InputError(f"draft model {draft_path}: speculative decoding is not built for image models")
        else:
            self.model, self.tokenizer = load_causal_lm(path, dtype)
        # Speculative decoding: a smaller model with the same tokenizer proposes tokens, this one verifies.
        self.draft = None
        if draft_path:
            self.draft, draft_tok = load_causal_lm(draft_path, dtype)
            if draft_tok.get_vocab() != self.tokenizer.get_vocab():  # would fail every request later
                raise InputError(f"draft model {draft_path}: its tokenizer differs from {path}'s; speculative "
                                 f"decoding needs the same vocabulary")
            # transformers' defaults stop drafting once the draft's top probability is under 0.4, which a
            # small draft rarely reaches: one draft token per target pass, slower than no draft. Draft by
            # length instead, adapted to acceptance (+2 after a fully accepted draft, -1 otherwise).
            gc = self.draft.generation_config
            gc.assistant_confidence_threshold = 0.0
            gc.num_assistant_tokens_schedule = "heuristic"
            gc.num_assistant_tokens = 5
        int8 = any(".quantized" in type(m).__module__ for m in self.model.modules())
        # torch.ao int8 kernels are CPU-only; everything else goes to the GPU when there is one.
        self.device = device or ("cuda" if torch.cuda.is_available() and not int8 else "cpu")
        self.model.to(self.device)
        if self.draft is not None:
            self.draft.to(self.device)
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch  # callback(rows, tokens) for metrics, once per decoding step
        self.created = int(time.time())
        cfg = self.model.config
        self.context_length = int(getattr(cfg.get_text_config(decoder=True), "max_position_embeddings", 2048) or 2048)
        # transformers keeps only the last window - 1 keys of a sliding-window layer, which the batch's
        # left-padded cache cannot follow: such models are served within their window, where sliding
        # and full attention are the same.
        text_cfg = cfg.get_text_config(decoder=True)
        window = getattr(text_cfg, "sliding_window", None) or getattr(text_cfg, "attention_chunk_size", None)
        layer_types = getattr(text_cfg, "layer_types", None)
        sliding = (window is not None and layer_types is None) or any(
            t in ("sliding_attention", "chunked_attention") for t in layer_types or [])
        if sliding and window:
            self.context_length = min(self.context_length, int(window) - 1)
        # Token ids a prompt may hold: rows of the embedding matrix (a tokenizer may know more).
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos_ids), 0)
        # Longest token in characters: a text of c characters has at least c / this many tokens.
        self.max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        self._inbox: queue.Queue[GenRequest | None] = queue.Queue()
        self._queued = 0  # submitted requests with no row started yet
        self._lock = threading.Lock()
        # Worker-thread state: waiting requests (arrival order), running rows and their batch tensors.
        self._pending: list[GenRequest] = []
        self._active: list[_Row] = []
        self._cache: Any = None  # DynamicCache, batch dimension aligned with _active
        self._mask: Any = None  # attention mask [rows, cache length + 0]
        self._logits: Any = None  # [rows, vocab] on the host: each row's next-token distribution
        self._step = 0
        self._thread = threading.Thread(target=self._worker, name=f"nexus-serve-{name}", daemon=True)
        self._thread.start()

    # -- prompts ---------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a chat rendered with the model's chat template (plain fallback if none)."""
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant: "
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_chat_prompt(self, messages: list[dict[str, Any]], images: list[Any]) -> tuple[list[int], Any]:
        """Token ids (each image's placeholder expanded) and ``pixel_values`` of a chat whose content parts
        hold ``{"type": "image"}`` entries, one per image in order."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.processor(text=[text], images=images, return_tensors="pt")
        return enc["input_ids"][0].tolist(), enc["pixel_values"]

    def audio_chat_prompt(self, messages: list[dict[str, Any]], clips: list[Any]) -> tuple[list[int], Any]:
        """Token ids (each clip's placeholder expanded) and the clips' ``input_features`` +
        ``feature_attention_mask`` of a chat whose content parts hold ``{"type": "audio"}`` entries, one per
        clip (float samples at the processor's rate) in order."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        rate = self.processor.feature_extractor.sampling_rate
        enc = self.processor(text=[text], audio=clips, sampling_rate=rate, return_tensors="pt")
        return enc["input_ids"][0].tolist(), {k: enc[k] for k in ("input_features", "feature_attention_mask")}

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt."""
        return self.tokenizer(text)["input_ids"]

    def queue_depth(self) -> int:
        """Requests waiting for their first batch slot."""
        return self._queued

    def running_rows(self) -> int:
        """Rows in the running batch."""
        return len(self._active)

    def submit(self, req: GenRequest) -> None:
        """Queue a request; its rows join the running batch at the next decoding steps."""
        for p_i, prompt in enumerate(req.prompts):
            for k in range(req.n):
                req.waiting.append(_Row(req=req, index=p_i * req.n + k, prompt=prompt))
        with self._lock:
            self._queued += 1
        self._inbox.put(req)

    def close(self) -> None:
        """Stop the worker thread after the current step."""
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # -- worker ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            if not self._take_inbox():
                return
            try:
                self._iteration()
            except Exception as exc:  # a broken step fails the running requests, never the server
                log.exception("serve %s: decoding step failed", self.name)
                for req in {id(r.req): r.req for r in self._active}.values():
                    self._fail(req, f"generation failed: {type(exc).__name__}: {exc}")
                self._active, self._cache, self._mask, self._logits = [], None, None, None

    def _take_inbox(self) -> bool:
        """Move new requests to the waiting list; block while there is nothing to do. False: shut down."""
        idle = not self._active and not self._pending
        try:
            first = self._inbox.get() if idle else self._inbox.get_nowait()
        except queue.Empty:
            return True
        items = [first]
        if idle and first is not None and self.batch_wait_s > 0:
            time.sleep(self.batch_wait_s)  # let a burst of simultaneous requests prefill together
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if item is None:
                return False
            self._pending.append(item)
        return True

    def _iteration(self) -> None:
        self._drop_cancelled()
        if self._speculative_candidate():
            return
        joining = self._admit()
        if joining:
            self._join(joining)
        if not self._active:
            return
        self._step += 1
        self._sample()
        if self._active:
            self._decode()

    def _drop_cancelled(self) -> None:
        for req in self._pending:
            if req.cancelled:
                req.waiting.clear()
                self._dequeue(req)
        self._pending = [r for r in self._pending if r.waiting]
        if any(r.req.cancelled for r in self._active):
            self._keep([i for i, r in enumerate(self._active) if not r.req.cancelled])

    def _dequeue(self, req: GenRequest) -> None:
        if not req.started:
            req.started = True
            with self._lock:
                self._queued -= 1

    def _admit(self) -> list[_Row]:
        """Rows that join the batch now: free slots, one row per waiting request in turn."""
        starving = [r for r in self._pending if r.running == 0 and r.waiting]
        free = self.max_batch_size - len(self._active)
        if starving and free < len(starving):
            self._preempt(len(starving) - max(free, 0))
            free = self.max_batch_size - len(self._active)
        # Requests with no running row first, then the others, each in arrival order.
        order = starving + [r for r in self._pending if r.running > 0 and r.waiting]
        joining: list[_Row] = []
        while free > 0 and any(r.waiting for r in order):
            for req in order:
                if free == 0:
                    break
                if req.waiting:
                    row = req.waiting.popleft()
                    row.joined = self._step
                    req.running += 1
                    self._dequeue(req)
                    joining.append(row)
                    free -= 1
        self._pending = [r for r in self._pending if r.waiting]
        return joining

    def _preempt(self, count: int) -> None:
        """Take ``count`` rows out of the batch (they keep their tokens and rejoin later)."""
        out: set[int] = set()
        for _ in range(count):
            held: dict[int, list[int]] = {}
            for i, r in enumerate(self._active):
                if i not in out:
                    held.setdefault(id(r.req), []).append(i)
            biggest = max(held.values(), key=len, default=[])
            if len(biggest) < 2:
                break  # every request holds one row: nothing to take without starving another
            victim = max(biggest, key=lambda i: (self._active[i].joined, i))  # least work to redo
            out.add(victim)
        if not out:
            return
        for i in sorted(out, reverse=True):
            row = self._active[i]
            row.req.running -= 1
            row.req.waiting.appendleft(row)
            if row.req not in self._pending:
                self._pending.append(row.req)
        self._pending.sort(key=lambda r: r.enqueued_at)
        self._keep([i for i in range(len(self._active)) if i not in out])

    def _keep(self, keep: list[int]) -> None:
        """Shrink the batch to rows ``keep`` (cache, mask, logits), cutting all-padding columns."""
        import torch

        self._active = [self._active[i] for i in keep]
        if not self._active:
            self._cache = self._mask = self._logits = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[idx.to(self._mask.device)]
        first = int(mask.any(0).long().argmax())  # first column some remaining row uses
        layers = [(k[idx.to(k.device)][..., first:, :], v[idx.to(v.device)][..., first:, :])
                  for k, v in _layers(self._cache)]
        self._cache = _cache(layers)
        self._mask = mask[:, first:]
        self._logits = self._logits[idx]

    def _join(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` (their full context) and merge them into the running batch."""
        try:
            cache, mask, logits = self._prefill(rows)
        except Exception as exc:
            by_req: dict[int, list[_Row]] = {}
            for r in rows:
                by_req.setdefault(id(r.req), []).append(r)
            if len(by_req) == 1:
                log.warning("serve %s: prefill failed: %s", self.name, exc)
                self._fail(rows[0].req, f"generation failed: {type(exc).__name__}: {exc}")
                return
            for group in by_req.values():  # isolate the request that breaks the batch
                self._join(group)
            return
        try:
            self._merge(rows, cache, mask, logits)
        except Exception as exc:  # these rows are in no list any more: answer their requests here
            for req in {id(r.req): r.req for r in rows}.values():
                self._fail(req, f"generation failed: {type(exc).__name__}: {exc}")
            raise

    def _prefill(self, rows: list[_Row]) -> tuple[Any, Any, Any]:
        import torch

        contexts = [r.prompt + r.ids for r in rows]
        width = max(len(c) for c in contexts)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[i, width - len(c):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        # every row of a request with images carries their tokens: one copy of its pixels per row, in row order
        pixels = [r.req.pixel_values for r in rows if r.req.pixel_values is not None]
        extra = {"pixel_values": torch.cat(pixels).to(dev, self.model.dtype)} if pixels else {}
        clips = [r.req.audio_features for r in rows if r.req.audio_features is not None]
        if clips:  # likewise one copy of a request's clips per row
            extra["input_features"] = torch.cat([c["input_features"] for c in clips]).to(dev, self.model.dtype)
            extra["feature_attention_mask"] = torch.cat([c["feature_attention_mask"] for c in clips]).to(dev)
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                             use_cache=True, **extra)
        return out.past_key_values, mask.to(dev), out.logits[:, -1, :].float().cpu()

    def _merge(self, rows: list[_Row], cache: Any, mask: Any, logits: Any) -> None:
        import torch

        for r in rows:
            if r.generator is None and r.req.sampling.seed is not None:
                seed = (r.req.sampling.seed + r.index) % 2**64
                r.generator = torch.Generator().manual_seed(seed)
        if not self._active:
            self._active, self._cache, self._mask, self._logits = list(rows), cache, mask, logits
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)

        def pad(t: Any, by: int) -> Any:  # zeros on the left of the time axis (dim -2 of keys/values)
            return t if by == 0 else torch.nn.functional.pad(t, (0, 0, by, 0))

        layers = [(torch.cat([pad(k0, width - old_len), pad(k1, width - new_len)]),
                   torch.cat([pad(v0, width - old_len), pad(v1, width - new_len)]))
                  for (k0, v0), (k1, v1) in zip(_layers(self._cache), _layers(cache), strict=True)]
        self._cache = _cache(layers)
        self._mask = torch.cat([torch.nn.functional.pad(self._mask, (width - old_len, 0)),
                                torch.nn.functional.pad(mask, (width - new_len, 0))])
        self._logits = torch.cat([self._logits, logits])
        self._active.extend(rows)

    def _sample(self) -> None:
        import torch

        logits = self._logits
        need_lp = any(r.req.sampling.logprobs for r in self._active)
        logprobs = torch.log_softmax(logits, dim=-1) if need_lp else None
        greedy = torch.argmax(logits, dim=-1).tolist()
        produced = 0
        for i, r in enumerate(self._active):
            if r.done or r.req.cancelled:
                continue
            try:
                s = r.req.sampling
                tok = greedy[i] if s.temperature <= 0 else self._pick(logits[i], r)
                produced += 1
                self._advance(r, tok, None if logprobs is None else logprobs[i])
            except Exception as exc:  # this row's request fails; its batch mates go on
                self._fail(r.req, f"generation failed: {type(exc).__name__}: {exc}")
        if self.on_batch is not None:
            self.on_batch(len(self._active), produced)
        finished = [i for i, r in enumerate(self._active) if r.done or r.req.cancelled]
        if finished:
            for i in finished:
                self._active[i].req.running -= 1
            gone = set(finished)
            self._keep([i for i in range(len(self._active)) if i not in gone])

    def _decode(self) -> None:
        import torch

        dev = self.device
        last = torch.tensor([[r.ids[-1]] for r in self._active], dtype=torch.long, device=dev)
        pos = torch.tensor([[len(r.prompt) + len(r.ids) - 1] for r in self._active], dtype=torch.long, device=dev)
        mask = torch.cat([self._mask, torch.ones((len(self._active), 1), dtype=self._mask.dtype, device=dev)], dim=1)
        with torch.inference_mode():
            out = self.model(input_ids=last, attention_mask=mask, position_ids=pos, past_key_values=self._cache,
                             use_cache=True)
        self._cache, self._mask = out.past_key_values, mask
        self._logits = out.logits[:, -1, :].float().cpu()

    def _fail(self, req: GenRequest, message: str) -> None:
        if not req.cancelled:
            req.emit(("error", message))
        req.cancelled = True  # its other rows leave at the next step
        req.waiting.clear()
        self._dequeue(req)

    # -- speculative decoding (one greedy request on an idle engine) -------------------------------
    def _speculative_candidate(self) -> bool:
        if self.draft is None or self._active or len(self._pending) != 1:
            return False
        req = self._pending[0]
        s = req.sampling
        # Assisted generation in transformers is exact for greedy decoding of one sequence and does not
        # return per-token alternatives; other requests take the batched path. A row handed over to the
        # batch (it has tokens already) stays there.
        if len(req.waiting) != 1 or req.n != 1 or s.temperature > 0 or s.logprobs or req.waiting[0].ids:
            return False
        self._pending = []
        row = req.waiting.popleft()
        self._dequeue(req)
        try:
            self._run_speculative(row)
        except Exception as exc:
            self._fail(req, f"generation failed: {type(exc).__name__}: {exc}")
        return True

    def _run_speculative(self, r: _Row) -> None:
        """Assisted generation for one row, streamed as tokens are accepted. When another request
        arrives it stops, and the row joins the batch with the tokens it has (recomputed like a
        preempted row), so speculation never holds up other clients."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        engine, s = self, r.req.sampling

        class Streamer:  # transformers' streamer protocol: put(token ids) per accepted chunk, end()
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                for tok in value.reshape(-1).tolist():
                    if r.done:
                        return
                    engine._advance(r, int(tok), None)

            def end(self) -> None:
                pass

        class Interrupt(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = r.done or r.req.cancelled or not engine._inbox.empty()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        ids = torch.tensor([r.prompt], device=self.device)
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=self.draft,
                                max_new_tokens=s.max_tokens, do_sample=False, pad_token_id=self.pad_id,
                                eos_token_id=None if s.ignore_eos else sorted(self.eos_ids), streamer=Streamer(),
                                stopping_criteria=StoppingCriteriaList([Interrupt()]))
        if self.on_batch is not None:
            self.on_batch(1, len(r.ids))
        if r.done or r.req.cancelled:
            return
        if len(r.ids) >= s.max_tokens:
            self._finish(r, "length")
        else:  # interrupted by a new request: go on in the batch
            r.req.waiting.appendleft(r)
            self._pending.append(r.req)

    # -- per-row decoding ---------------------------------------------------------------------------
    def _pick(self, logits: Any, row: _Row) -> int:
        import torch

        s = row.req.sampling
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _token_text(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def _advance(self, r: _Row, tok: int, logprobs: Any) -> None:
        s = r.req.sampling
        if s.logprobs and logprobs is not None:
            entry: dict[str, Any] = {"token": self._token_text(tok), "id": tok,
                                     "logprob": _finite(float(logprobs[tok])), "top_logprobs": []}
            if s.top_logprobs:
                vals, idx = logprobs.topk(min(s.top_logprobs, logprobs.shape[-1]))
                entry["top_logprobs"] = [{"token": self._token_text(int(t)), "id": int(t), "logprob": _finite(float(v))}
                                         for v, t in zip(vals, idx, strict=True)]
            r.pending_lp.append(entry)
        if tok in self.eos_ids and not s.ignore_eos:
            self._finish(r, "stop")
            return
        r.ids.append(tok)
        r.text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
        for stop in s.stop:
            cut = r.text.find(stop)
            if cut != -1:
                r.text = r.text[:cut]
                self._finish(r, "stop")
                return
        if len(r.ids) >= s.max_tokens:
            self._finish(r, "length")
            return
        # Hold back what could still become a stop string, and half-decoded UTF-8 sequences.
        hold = max((len(x) for x in s.stop), default=1) - 1
        safe = len(r.text) - hold
        while safe > r.sent and r.text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > r.sent:
            self._flush(r, safe)

    def _flush(self, r: _Row, upto: int) -> None:
        r.req.emit(("token", r.index, r.text[r.sent:upto], r.pending_lp))
        r.sent, r.pending_lp = upto, []

    def _finish(self, r: _Row, reason: str) -> None:
        if len(r.text) > r.sent or r.pending_lp:
            self._flush(r, len(r.text))
        r.done = True
        r.req.emit(("done", r.index, reason, len(r.prompt), len(r.ids)))


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) per layer of a DynamicCache, each ``[rows, heads, time, head_dim]``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _finite(x: float) -> float:
    """JSON has no -inf: clamp impossible tokens to a very small log-probability."""
    return x if math.isfinite(x) else -9999.0
