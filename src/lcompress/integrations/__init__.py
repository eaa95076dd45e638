"""Optional integrations with training frameworks.

Nothing is imported here: each integration is a submodule that imports its framework on first use, so
``import lcompress`` never pulls one in.

* :mod:`lcompress.integrations.lightning` — :class:`~lcompress.integrations.lightning.LCCallback`, a PyTorch
  Lightning callback (needs ``pip install lightning``, or the ``lightning`` extra of lcompress).
"""
