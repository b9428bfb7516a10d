"""``xmodal-eval experiment=<name> [key=value ...]``: run a training-free evaluator."""

from xmodal.cli._hydra import hydra_entry
from xmodal.pipeline import evaluate

main = hydra_entry("eval", evaluate)

if __name__ == "__main__":
    main()
