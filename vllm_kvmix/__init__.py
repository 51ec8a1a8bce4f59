"""vllm-kvmix: a vLLM plugin that stores the paged KV cache with separate key and value bit widths."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vllm-kvmix")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
