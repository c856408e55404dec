"""Request bodies (pydantic, validated by FastAPI; a bad field is answered 400 naming it).

OpenAI's completion fields the server honours: ``model``, ``prompt`` / ``messages``, ``max_tokens``,
``temperature`` (0 = greedy), ``top_p``, ``stop``, ``stream``; ``n`` must be 1.  Unknown fields are
ignored, as OpenAI-compatible servers do.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

MAX_ITEMS = 64  # inputs / prompts per request


class _Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = Field(None, validate_default=True)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > 4:
            raise ValueError("at most 4 stop strings")
        return [s for s in v if s]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= MAX_ITEMS:
            raise ValueError(f"expected 1 to {MAX_ITEMS} prompts")
        return v


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class ClassifyRequest(BaseModel):
    """``input``: a text, or a list of texts (token classification splits each on whitespace into words);
    ``tokens``: instead of ``input``, pre-split words (token classification)."""
    model: str
    input: Optional[Union[str, list[str]]] = None
    tokens: Optional[list[list[str]]] = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        if isinstance(v, list) and not 1 <= len(v) <= MAX_ITEMS:
            raise ValueError(f"expected 1 to {MAX_ITEMS} texts")
        return v


class LoadRequest(BaseModel):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
