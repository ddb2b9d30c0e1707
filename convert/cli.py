"""`jaxmodels convert`: check a Hugging Face checkpoint and rewrite it as a plain one in another dtype.

    jaxmodels convert --model PATH --out DIR [--dtype bf16|f32] [--max-shard-size 5GB]

Every tensor is validated exactly as `jaxmodels.from_pretrained` validates it (names, shapes, FP8 scales;
DeepSeek's multi-token-prediction layers are skipped), FP8 weights are dequantised, and the result is
written in the hub's layout (sharded, with an index) for transformers or jaxmodels to load. It streams
tensor by tensor, so converting DeepSeek-V3's FP8 release to bf16 needs host memory for about one
shard, not the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jaxmodels.units import DTYPES



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory with config.json and safetensors "
                        "(or a hub id, when online)")
    parser.add_argument("--out", required=True, help="output directory (created; an existing checkpoint there "
                        "is replaced only once the new one is completely written)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype of the output (default: the checkpoint's own dtype; FP8 "
                             "checkpoints declare bf16)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-mtp", action="store_true",
                        help="drop DeepSeek-V3's multi-token-prediction layers (kept by default; transformers "
                             "ignores them only at layer index 61)")


def run(args: argparse.Namespace) -> int:
    from jaxmodels.config import ConfigError
    from jaxmodels.convert.hf import INDEX_FILE, convert_checkpoint
    from jaxmodels.convert.keymap import CheckpointError
    from jaxmodels.units import parse_size

    try:
        max_shard_size = parse_size(args.max_shard_size, "--max-shard-size")
        if os.path.abspath(args.out) == os.path.abspath(args.model):
            raise ValueError(f"--out {args.out!r} is the input checkpoint; write the conversion to a new directory")
        dtype = None if args.dtype is None else DTYPES[args.dtype]
        start = time.perf_counter()
        out = convert_checkpoint(args.model, args.out, dtype, max_shard_size=max_shard_size,
                                 mtp=False if args.no_mtp else None,
                                 progress=not args.quiet)
    except (OSError, CheckpointError, ConfigError, ValueError) as e:  # OSError: a path (missing, unwritable)
        print(f"jaxmodels convert: error: {e}", file=sys.stderr)
        return 1
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    index = " + " + INDEX_FILE if os.path.exists(os.path.join(out, INDEX_FILE)) else ""
    print(f"wrote {out}: config.json + {len(files)} safetensors file(s){index}, {total / 1e9:.3f} GB, "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
