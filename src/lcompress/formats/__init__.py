"""Writers for other runtimes' file formats (the ``.lcz`` file stays lcompress's own, :mod:`lcompress.export`).

Nothing is imported here: each format is a submodule that imports its dependencies on first use, so
``import lcompress`` never pulls one in.

* :mod:`lcompress.formats.gguf` — :func:`~lcompress.formats.gguf.export_gguf`: a compressed Llama model as a GGUF
  file for llama.cpp, its grouped-integer weights in GGUF's own block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), packed
  from Θ so that nothing is rounded (needs the ``hf`` extra: ``pip install lcompress[hf]``).
* :mod:`lcompress.formats.onnx` — :func:`~lcompress.formats.onnx.export_onnx`: a compressed model as an ONNX file
  for ONNX Runtime, its grouped-integer Linear layers as ``com.microsoft.MatMulNBits`` with Θ's codes packed and
  its codebook and low-rank layers compact (needs the ``onnx`` extra: ``pip install lcompress[onnx]``).
"""
