"""Convert a TRUSTED pickled checkpoint that the safe loader refuses into a file of tensors.

    python tools/convert_checkpoint.py --trust old_model.pth old_model_weights.pth

Checkpoints are read with ``torch.load(weights_only=True)``, which refuses a pickle holding
Python objects other than tensors (a whole model saved with ``torch.save(model)``, another
library's training state, or code to run). This script unpickles the file WITHOUT that guard,
which runs whatever code the file names: use it only on files from a source you trust. It keeps
the state dict's tensors (of a model, a ``{"state_dict": ...}`` checkpoint or a state dict) and
writes them as a bare state dict that every script here accepts.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse

from lib.models.checkpoint import CheckpointError, convert_trusted_checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the trusted pickled checkpoint")
    parser.add_argument("target", help="where to write the tensors-only state dict")
    parser.add_argument("--trust", action="store_true",
                        help="required: you trust the source file (unpickling runs its code)")
    args = parser.parse_args(argv)
    if not args.trust:
        raise SystemExit("error: unpickling runs code named in the file; pass --trust if (and "
                         f"only if) you trust the source of {args.source}")
    if not pathlib.Path(args.source).is_file():
        raise SystemExit(f"error: checkpoint not found: {args.source}")
    try:
        count = convert_trusted_checkpoint(args.source, args.target)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{count} tensors written to {args.target}")


if __name__ == "__main__":
    main()
