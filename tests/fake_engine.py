"""A fake AsyncEngine for in-process app tests: no model, answers "Hel", "lo", "!" (3 tokens).

(A module with a unique name, importable from every test folder.)
"""

from __future__ import annotations

import asyncio

from dspark_serve.engine import CompletionOutput, RequestOutput


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, chat_template=None, **kw):
        if chat_template is not None:  # a template given by the server (--chat-template)
            import jinja2

            return jinja2.Template(chat_template).render(messages=messages, **kw)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 200 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def __len__(self):
        return 200


class FakeEngine:
    """Answers every request with the pieces "Hel", "lo", "!" (3 tokens)."""

    model_name = "fake-model"
    max_model_len = 256
    vocab_size = 1000
    dtype = "float32"
    device = "cpu"
    speculative_method = "none"
    dead = None

    def __init__(self, pieces=("Hel", "lo", "!"), model_path=None):
        self.pieces = list(pieces)
        self.model_path = model_path  # an HF directory: its generation_config.json gives sampling defaults
        self.tokenizer = FakeTokenizer()
        self.calls: list = []
        self.aborted: list[str] = []
        self.fail_with: Exception | None = None
        self.finish_reason = "length"
        self.delay = 0.0  # seconds before each piece (timeouts)

    async def generate(self, prompt=None, params=None, request_id=None, prompt_token_ids=None):
        if self.fail_with is not None:  # like AsyncEngine: refused before the first await
            raise self.fail_with
        self.calls.append((request_id, params, prompt_token_ids))
        text, ids = "", []
        for i, piece in enumerate(self.pieces):
            await asyncio.sleep(self.delay)
            text += piece
            ids.append(i)
            done = i == len(self.pieces) - 1
            comp = CompletionOutput(0, text, list(ids), self.finish_reason if done else None,
                                    delta_text=piece, delta_token_ids=[i])
            yield RequestOutput(request_id, None, prompt_token_ids, [comp], done,
                                error="boom" if done and self.finish_reason == "error" else None,
                                metrics={"arrival_time": 0.0, "first_token_time": 0.1, "finish_time": 0.3})

    def abort(self, request_id):
        self.aborted.append(request_id)

    def stats(self):
        return {"num_running": 0, "num_waiting": 0, "kv_used_blocks": 0, "kv_total_blocks": 10, "block_size": 16,
                "steps": 0, "preemptions": 0, "aborted": 0, "finished": {}, "prompt_tokens": 0,
                "generation_tokens": 0, "spec_num_drafts": 0, "spec_num_proposed_tokens": 0,
                "spec_num_draft_tokens": 0, "spec_num_accepted_tokens": 0, "spec_accepted_per_pos": [1, 2],
                "spec_verify_length_counts": {0: 3, 2: 1}}
