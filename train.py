"""Train xllm with LightningCLI: `python train.py fit --config configs/tiny/common.yaml --config configs/tiny/stage1.yaml` (`--help`, `--print_config`)."""

from xllm.training.cli import main

if __name__ == "__main__":
    main()
