"""Request and response bodies (pydantic), which are also the OpenAPI docs at /docs."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

EncodingFormat = Literal["float", "base64"]


def _unicode(texts: list[str]) -> list[str]:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can encode: name the first."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"item {i} is not valid Unicode text ({e.reason} at position {e.start})") from None
    return texts


def _strings(value, what: str):
    """Accept a string or a list of strings, with a message naming the first bad item."""
    if isinstance(value, str):
        _unicode([value])
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"item {i} is {type(item).__name__}, expected a string{what}")
        return _unicode(value)
    raise ValueError(f"expected a string or a list of strings, got {type(value).__name__}")


class TextEmbeddingRequest(BaseModel):
    """OpenAI's embeddings request. Token-id arrays are not accepted: the model has its own tokenizer."""

    model_config = ConfigDict(extra="ignore")
    input: Union[str, list[str]] = Field(description="a text or a list of texts", examples=[["a red heart"]])
    model: Optional[str] = Field(None, description="the served model's id (see /v1/models); optional")
    encoding_format: EncodingFormat = Field(
        "float", description="'float' lists, or 'base64' of little-endian float32 bytes")
    dimensions: Optional[int] = Field(None, description="must equal the model's embedding size if given")
    user: Optional[str] = Field(None, description="accepted and ignored (OpenAI compatibility)")

    @field_validator("input", mode="before")
    @classmethod
    def _input_is_text(cls, value):
        return _strings(value, " (token-id arrays are not supported; send text)")


class ImageEmbeddingRequest(BaseModel):
    """JSON form of /v1/images/embeddings (multipart uploads are the other form)."""

    model_config = ConfigDict(extra="ignore")
    input: Union[str, list[str], None] = Field(
        None, description="base64-encoded images (PNG, JPEG, GIF, WEBP, BMP, TIFF), plain or as data: URLs")
    model: Optional[str] = None
    encoding_format: EncodingFormat = "float"

    @field_validator("input", mode="before")
    @classmethod
    def _input_is_base64(cls, value):
        return value if value is None else _strings(value, " (base64 image data)")


class ClassifyRequest(ImageEmbeddingRequest):
    """Zero-shot classification: images plus candidate labels (and optional prompt templates)."""

    labels: list[str] = Field(description="candidate labels", examples=[["heart", "dog", "star"]])
    templates: Optional[list[str]] = Field(
        None, description="prompt templates with a '{}' placeholder, averaged per label "
                          "(default: the label itself)", examples=[["an emoji of a {}"]])
    top_k: Optional[int] = Field(None, ge=1, description="return only the k most probable labels per image")

    @field_validator("labels", "templates")
    @classmethod
    def _valid_unicode(cls, value):
        return value if value is None else _unicode(value)


# -- responses (documentation; handlers build the JSON directly) ---------------

class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    truncated: int = Field(0, description="texts cut to the model's context length")
    truncated_indices: list[int] = Field(default_factory=list)


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class LabelProbability(BaseModel):
    label: str
    probability: float


class Classification(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    label: str
    probability: float
    ranking: list[LabelProbability]


class ClassifyResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: dict


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail
