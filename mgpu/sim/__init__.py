"""The simulator: a simulated GPU and simulated consumers, for ``--demo`` and the tests.

- ``gpu``: the memory ledgers the consumers write and ``SimGpuReader``, which reads them;
- ``consumers``: mvoice, whisper.cpp, Ollama, ComfyUI and an OpenAI-style speech
  server: load, work, unload;
- ``http``: a consumer's HTTP resource, its ``/_sim/`` API and ranged synthetic bodies;
- ``demo``: the four consumers inside the daemon (``twistd mgpumanager --demo``);
- ``__main__``: one consumer as its own process (``python -m mgpu.sim``).
"""

from mgpu.sim.demo import Demo, start_demo

__all__ = ["Demo", "start_demo"]
