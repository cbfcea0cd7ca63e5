"""`python -m xllm.demo`: see `xllm.demo.pipeline`."""

from xllm.demo.pipeline import main

main()
