"""A stand-in for mistral_cuda._C.Model whose outputs are fixed in advance.

`mc.Engine(ScriptedModel(...), tokenizer)` runs the real generation path (batching, sampling,
stop handling, streaming, detokenization, guards, tool-call parsing) while the "model" makes the
scripted tokens come out: after a prompt it has a script for, the logits of step i put the
script's token i on top by a margin of 1e4 (so greedy and sampled decoding alike draw it), and
EOS once the script is exhausted.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List, Sequence

import torch

MARGIN = 1e4


class ScriptedModel:
    def __init__(self, vocab_size: int, eos_id: int, scripts: Dict[tuple, Sequence[int]], max_seq_len: int = 8192):
        self.config = SimpleNamespace(vocab_size=vocab_size, sliding_window=None, max_seq_len=max_seq_len)
        self.device = "cpu"
        self.eos_id = eos_id
        self.scripts = {tuple(p): list(s) for p, s in scripts.items()}
        self._history: Dict[int, List[int]] = {}
        self._next_seq = 0
        self.prompts_seen: List[List[int]] = []

    def add_script(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        self.scripts[tuple(prompt_ids)] = list(output_ids)

    def add_sequence(self) -> int:
        self._next_seq += 1
        self._history[self._next_seq] = []
        return self._next_seq

    def free_sequence(self, seq: int) -> None:
        del self._history[seq]

    def live_sequences(self) -> int:
        return len(self._history)

    def step(self, entries, all_logits: bool = False):
        assert not all_logits
        rows = []
        for seq, tokens in entries:
            history = self._history[seq]
            if not history:
                self.prompts_seen.append(list(tokens))
            history.extend(int(t) for t in tokens)
            row = torch.zeros(self.config.vocab_size, dtype=torch.float32)
            row[self._next_token(history)] = MARGIN
            rows.append(row)
        return rows

    def _next_token(self, history: List[int]) -> int:
        for prompt, script in self.scripts.items():
            if len(history) < len(prompt) and prompt[: len(history)] == tuple(history):
                return self.eos_id  # a prefill chunk: its logits are not sampled
            if tuple(history[: len(prompt)]) == prompt:
                i = len(history) - len(prompt)
                return script[i] if i < len(script) else self.eos_id
        raise AssertionError(f"no script for a prompt starting {history[:12]}... ({len(history)} tokens)")
