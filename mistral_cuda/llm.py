"""A vLLM-shaped facade: `mc.LLM(model, **engine_kwargs)` with `.generate` and `.chat`
returning `RequestOutput`s, so vLLM offline-inference code runs with the import changed."""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence, Union

from mistral_cuda.engine import Engine
from mistral_cuda.generation import RequestOutput
from mistral_cuda.sampling import SamplingParams

Params = Union[None, SamplingParams, Sequence[SamplingParams]]


class LLM:
    """`LLM(model_dir, **kwargs)`: kwargs are Engine.from_pretrained's (device, dtype,
    max_num_seqs, max_num_batched_tokens, num_blocks, ...)."""

    def __init__(self, model: str, **engine_kwargs):
        engine_kwargs.setdefault("progress", False)
        self.engine = Engine.from_pretrained(model, **engine_kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _outputs(self, prompts: List, prompt_texts: List[Optional[str]], sampling_params: Params) -> List[RequestOutput]:
        groups = self.engine.generate_requests(prompts, sampling_params)
        return [
            RequestOutput(
                request_id=str(next(self._ids)),
                prompt=text,
                prompt_token_ids=group[0].prompt_token_ids,
                outputs=group,
                finished=all(o.finish_reason != "abort" for o in group),
            )
            for text, group in zip(prompt_texts, groups)
        ]

    def generate(self, prompts, sampling_params: Params = None) -> List[RequestOutput]:
        """prompts: a str, a list of str, or token-id lists (also vLLM's {"prompt_token_ids": [...]}
        or {"prompt": str} dicts); one RequestOutput per prompt, in order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        items, texts = [], []
        for prompt in prompts:
            if isinstance(prompt, dict):
                if "prompt_token_ids" in prompt:
                    items.append(list(prompt["prompt_token_ids"]))
                    texts.append(prompt.get("prompt"))
                    continue
                prompt = prompt["prompt"]
            items.append(prompt)
            texts.append(prompt if isinstance(prompt, str) else None)
        return self._outputs(items, texts, sampling_params)

    def chat(self, messages, sampling_params: Params = None, **chat_kwargs) -> List[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them;
        the [INST] template is applied by the tokenizer."""
        conversations: List[List[Dict]] = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine._require_tokenizer("chat")
        ids = [tok.encode_chat(conversation, **chat_kwargs) for conversation in conversations]
        return self._outputs(ids, [None] * len(ids), sampling_params)
