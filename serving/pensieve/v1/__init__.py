"""Generated protocol buffers of the pensieve.v1 API (python -m serving.codegen)."""
