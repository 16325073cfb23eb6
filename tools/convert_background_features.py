"""Convert the reference MEMOIR editor's background features (.pt) to .safetensors, once.

The reference stores the features of irrelevant sentences with ``torch.save`` (a pickle). memoir
never unpickles user files; this one-off converter reads the ``.pt`` file with
``torch.load(..., weights_only=True)`` (tensors only, no code can run), checks it is a finite
``[N, D]`` float tensor, and writes it under the key ``background_features``:

    python tools/convert_background_features.py llama3_background_features.pt llama3-8b.safetensors

Then set ``dir_background_features: llama3-8b.safetensors`` in the hparams yaml.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the reference's .pt background features")
    parser.add_argument("destination", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not args.destination.endswith(".safetensors"):
        parser.error("the destination must end with .safetensors")
    from memoir.easyedit import convert_background_features

    features = convert_background_features(args.source, args.destination)
    print(f"wrote {args.destination}: {features.shape[0]} x {features.shape[1]} background features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
