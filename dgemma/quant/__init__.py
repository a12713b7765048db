"""Weight-only quantisation (symmetric int8 per output channel, int4 in groups of 64, bf16 scales).

``formats`` (quantise / dequantise / pack tensors), ``modules`` (the quantised weight boundaries:
``QuantizedLinear``, ``QuantizedExperts``, ``Int8Embedding``), ``apply`` (``quantize_model`` after loading,
``stored_bytes``), ``accounting`` (the exact bytes of each format from the config alone; ``dgemma info``).
"""

from dgemma.quant.apply import quantize_model, stored_bytes, stored_bytes_by_part

__all__ = ["quantize_model", "stored_bytes", "stored_bytes_by_part"]
