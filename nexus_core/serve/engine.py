"""Generation engine behind the server: loads one local model, groups waiting requests into batches.

A single worker thread per model owns the model. Requests go into a queue; the worker takes the first
one, waits a few milliseconds for more, and decodes all of them together (left-padded, one forward
pass per token for the whole batch, KV cache). Each row has its own sampling parameters, stop strings
and token budget, and its tokens are pushed back to the caller's asyncio loop as they are produced,
so streaming and non-streaming requests share one code path.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nexus_core.models.io import load_causal_lm


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
    """

    prompts: list[list[int]]
    sampling: Sampling
    n: int = 1
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)

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


class Engine:
    """One served model: its tokenizer, a request queue and the batching worker thread."""

    def __init__(self, name: str, path: str | Path, *, max_batch_size: int = 16, batch_wait_s: float = 0.005,
                 dtype: str = "float32", on_batch: Any = None, draft_path: str | Path | None = None,
                 device: str | None = None):
        import torch

        self.name = name
        self.path = str(path)
        self.model, self.tokenizer = load_causal_lm(path, dtype)
        # Speculative decoding: a smaller model with the same tokenizer proposes tokens, this one verifies.
        self.draft = load_causal_lm(draft_path, dtype)[0] if draft_path else None
        int8 = any(".quantized" in type(m).__module__ for m in self.model.modules())
        # torch.ao int8 kernels are CPU-only; everything else goes to the GPU when there is one.
        self.device = device or ("cuda" if torch.cuda.is_available() and not int8 else "cpu")
        self.model.to(self.device)
        if self.draft is not None:
            self.draft.to(self.device)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch  # callback(rows, tokens) for metrics
        self.created = int(time.time())
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = {self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos_ids), 0)
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
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

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt."""
        return self.tokenizer(text)["input_ids"]

    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return self._queue.qsize()

    def submit(self, req: GenRequest) -> None:
        """Queue a request; the worker will batch it with whatever else is waiting."""
        self._queue.put(req)

    def close(self) -> None:
        """Stop the worker thread after the current batch."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- worker ----------------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            rows = len(first.prompts) * first.n
            deadline = time.perf_counter() + self.batch_wait_s
            while rows < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # shut down after this batch
                    break
                batch.append(nxt)
                rows += len(nxt.prompts) * nxt.n
            try:
                self._run_batch(batch)
            except Exception as exc:  # a broken batch must not kill the server
                for req in batch:
                    req.emit(("error", f"generation failed: {type(exc).__name__}: {exc}"))

    def _run_batch(self, batch: list[GenRequest]) -> None:
        import torch

        rows: list[_Row] = []
        for req in batch:
            for p_i, prompt in enumerate(req.prompts):
                for k in range(req.n):
                    gen = None
                    if req.sampling.seed is not None:
                        gen = torch.Generator().manual_seed(req.sampling.seed + k)
                    rows.append(_Row(req=req, index=p_i * req.n + k, prompt=prompt, generator=gen))
        if self.draft is not None and len(rows) == 1 and self._speculative_ok(rows[0]):
            self._run_speculative(rows[0])
            return
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token lands in the last column
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            attn[i, width - len(r.prompt):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
        budget = max(r.req.sampling.max_tokens for r in rows)
        produced = 0
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu()  # sampling and logprobs happen on the host
            last_pos = pos[:, -1]
            for _step in range(budget):
                next_ids = torch.full((len(rows),), self.pad_id, dtype=torch.long)
                logprobs = torch.log_softmax(logits, dim=-1)
                for i, r in enumerate(rows):
                    if r.done or r.req.cancelled:
                        r.done = True
                        continue
                    tok = self._pick(logits[i], r)
                    next_ids[i] = tok
                    produced += 1
                    self._advance(r, tok, logprobs[i])
                if all(r.done for r in rows):
                    break
                attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=torch.long, device=dev)], dim=1)
                last_pos = last_pos + 1
                out = self.model(input_ids=next_ids[:, None].to(dev), attention_mask=attn,
                                 position_ids=last_pos[:, None], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float().cpu()
        for r in rows:
            if not r.done:
                self._finish(r, "length")
        if self.on_batch is not None:
            self.on_batch(len(rows), produced)

    @staticmethod
    def _speculative_ok(row: _Row) -> bool:
        # Assisted generation in transformers is exact for greedy decoding of one sequence and does not
        # return per-token alternatives; other requests take the batched path.
        s = row.req.sampling
        return s.temperature <= 0 and not s.logprobs and row.req.n == 1

    def _run_speculative(self, r: _Row) -> None:
        import torch

        s = r.req.sampling
        ids = torch.tensor([r.prompt], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), assistant_model=self.draft,
                                      max_new_tokens=s.max_tokens, do_sample=False, pad_token_id=self.pad_id,
                                      eos_token_id=None if s.ignore_eos else sorted(self.eos_ids))
        for tok in out[0, ids.shape[1]:].tolist():
            self._advance(r, tok, None)
            if r.done:
                break
        if not r.done:
            self._finish(r, "length")
        if self.on_batch is not None:
            self.on_batch(1, len(r.ids))

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
        if s.logprobs:
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


def _finite(x: float) -> float:
    """JSON has no -inf: clamp impossible tokens to a very small log-probability."""
    return x if math.isfinite(x) else -9999.0
