"""A stand-in for the core's model and scheduler whose outputs are fixed in advance.

`engine_on(ScriptedModel(...), tokenizer)` is an `mc.Engine` whose generation path
(requests, stop handling, streaming, detokenization, guards, tool-call parsing) runs for real,
while the scheduler it talks to (the `_C.Scheduler` interface: add, step, abort) makes the
scripted tokens come out: after a prompt it has a script for, output token i is the script's
token i, and EOS once the script is exhausted. Token-level finishes follow the core's rules
(EOS unless ignore_eos, stop token ids, max_tokens).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Sequence

import mistral_cuda as mc


class ScriptedModel:
    def __init__(self, vocab_size: int, eos_id: int, scripts: Dict[tuple, Sequence[int]], max_seq_len: int = 8192):
        self.config = SimpleNamespace(vocab_size=vocab_size, sliding_window=None, max_seq_len=max_seq_len)
        self.device = "cpu"
        self.max_step_tokens = 1 << 20
        self.eos_id = eos_id
        self.scripts = {tuple(p): list(s) for p, s in scripts.items()}
        self.prompts_seen: List[List[int]] = []
        self.scheduler = ScriptedScheduler(self)

    def add_script(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        self.scripts[tuple(prompt_ids)] = list(output_ids)

    def live_sequences(self) -> int:
        return len(self.scheduler.requests)

    # The KV-pool accounting mc.AsyncEngine reads: one block per live request.
    def num_blocks(self) -> int:
        return 1024

    def free_blocks(self) -> int:
        return self.num_blocks() - self.live_sequences()

    def next_token(self, prompt: List[int], output: List[int]) -> int:
        script = self.scripts.get(tuple(prompt))
        if script is None:
            raise AssertionError(f"no script for a prompt starting {prompt[:12]}... ({len(prompt)} tokens)")
        return script[len(output)] if len(output) < len(script) else self.eos_id


class ScriptedScheduler:
    """The `_C.Scheduler` interface over a ScriptedModel: one token per request per step."""

    def __init__(self, model: ScriptedModel):
        self.model = model
        self.requests: Dict[int, SimpleNamespace] = {}
        self.next_id = 1
        self.stats = {"last_batch_tokens": 0, "preemptions": 0, "steps": 0}

    def add(self, prompt, params) -> int:
        rid = self.next_id
        self.next_id += 1
        self.model.prompts_seen.append(list(prompt))
        self.requests[rid] = SimpleNamespace(prompt=list(prompt), params=params, output=[])
        return rid

    @property
    def next_request_id(self) -> int:
        return self.next_id

    def add_group(self, prompt, params) -> list:
        return [self.add(prompt, p) for p in params]

    def abort(self, rid: int) -> bool:
        return self.requests.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.requests)

    def step(self):
        updates = []
        for rid, r in list(self.requests.items()):
            token = self.model.next_token(r.prompt, r.output)
            r.output.append(token)
            p = r.params
            finish, stop_token = "", -1
            if (token == p.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
                finish, stop_token = "stop", token
            elif len(r.output) >= p.max_tokens:
                finish = "length"
            if finish:
                del self.requests[rid]
            updates.append((rid, token, 0.0, 1, [], finish, stop_token))
        self.stats["last_batch_tokens"] = len(updates)
        self.stats["steps"] += 1
        return updates


def engine_on(model: ScriptedModel, tokenizer) -> "mc.Engine":
    engine = mc.Engine(model, tokenizer)
    engine._scheduler = model.scheduler
    return engine
