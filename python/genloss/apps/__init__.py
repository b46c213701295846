"""The applications built on the genloss library: the ``genloss`` command and what it runs.

``genloss.apps.cli`` (the command: ``demo``, ``verify``, ``bench``, ``info``),
``genloss.apps.demo`` (toy models trained with the torch ops), ``genloss.apps.verify``
(every op on every backend against the NumPy reference) and ``genloss.apps.bench``
(a quick benchmark against torch eager and ``torch.compile``). The library core
(``genloss``, ``genloss.reference``, ``genloss.native``, ``genloss.torch``,
``genloss.registry``) never imports this package: the applications may need
extras (torch, matplotlib) that the library itself does not.
"""
