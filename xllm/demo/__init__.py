"""The demos and their fixtures, kept out of the library core: `python -m xllm.demo` (the image demo),
`xllm.demo.materialize` (pip-packaged weights -> model directories), `xllm.demo.synthetic` (the shapes task),
`xllm.demo.tiny` (tiny random models + data for tests and smoke runs)."""
