"""The tokenizer's error: bad input, an unsupported vocabulary, a chat template that fails."""


class TokenizerError(ValueError):
    pass


def clip(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters (error messages may quote client input)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
