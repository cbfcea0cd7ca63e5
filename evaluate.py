"""Evaluate an adapter: `python evaluate.py --adapter DIR --data FILE.jsonl --output out.json` (`--help`)."""

from xllm.evaluation.run import main

if __name__ == "__main__":
    main()
