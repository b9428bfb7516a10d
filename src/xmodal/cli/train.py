"""``xmodal-train experiment=<name> [key=value ...]``: fit a method, test it, write metrics.json."""

from xmodal.cli._hydra import hydra_entry
from xmodal.pipeline import train

main = hydra_entry("train", train)

if __name__ == "__main__":
    main()
