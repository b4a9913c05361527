"""The offline data preparation tool: ``python -m dpjax.prepare`` turns
image(-text) data into deduplicated ArrayRecord shards that dpjax trains on
(``__main__`` documents the command, its passes and its outputs).

Modules: ``run`` (``prepare(...)``: all passes), ``stage`` (pass 1 and 3),
``plan`` (pass 2), ``readers`` (input formats), ``dedup`` (image hashes),
``records`` (the msgpack record format, also used by the test fixtures);
``__main__`` is the command line. An offline tool: nothing of the training
runtime imports this package (``tests/layers_test.py``); it reads
``dpjax.data`` (manifest, folder index).
"""
