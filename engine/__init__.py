"""dspark-serve engine: continuous batching over a paged KV cache.

    from dspark_serve.engine import LLM, SamplingParams
    llm = LLM()  # the embedded default model
    print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))[0].outputs[0].text)
"""

from .async_engine import AsyncEngine, EngineDeadError, QueueFullError
from .engine import EngineConfig, LLMEngine, RequestError
from .llm import LLM, apply_chat_template
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams, SamplingParamsError

__all__ = [
    "LLM", "SamplingParams", "SamplingParamsError", "RequestOutput", "CompletionOutput",
    "LLMEngine", "EngineConfig", "AsyncEngine", "RequestError", "EngineDeadError",
    "QueueFullError", "apply_chat_template",
]
