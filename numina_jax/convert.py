"""Convert between Hugging Face gpt-oss checkpoints and our Orbax checkpoints.

  python -m numina_jax.convert import --hf openai/gpt-oss-20b --out ckpt/gpt-oss-20b
  python -m numina_jax.convert export --checkpoint workdir/checkpoints --out hf_out --tokenizer openai/gpt-oss-20b
"""

from __future__ import annotations

import argparse
import re
import sys

from numina_jax import storage
from numina_jax.cli import parse_mesh

USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m numina_jax.convert", description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="examples:\n" + "\n".join(__doc__.strip().splitlines()[2:]) +
             "\n\nBoth directions stream tensor by tensor; the host never holds the whole model.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{import,export}")

  imp = sub.add_parser(
      "import", help="HF checkpoint (dense or MXFP4 safetensors) -> Orbax checkpoint",
      description="Read a Hugging Face gpt-oss checkpoint (a local folder or a Hub id; MXFP4 experts are "
                  "dequantized) and write an Orbax checkpoint the trainer can start from.")
  imp.add_argument("--hf", required=True, metavar="PATH_OR_ID",
                   help="local checkpoint folder, or a Hub repo id such as openai/gpt-oss-20b (copy a gs:// "
                        "folder to a local one first)")
  imp.add_argument("--out", required=True, metavar="CKPT_DIR",
                   help="Orbax checkpoint folder to create (local or gs://)")
  imp.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="parameter dtype to store (default: %(default)s; MXFP4 values are exact in both)")
  imp.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for a Hub id")
  imp.add_argument("--mesh", type=parse_mesh, default={"fsdp": -1}, metavar="AXIS=N,...",
                   help="device mesh to load into, axes data/fsdp/expert/tensor, one may be -1 "
                        "(default: fsdp=-1, every local device on fsdp)")
  imp.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
  imp.set_defaults(func=run_import)

  exp = sub.add_parser(
      "export", help="Orbax checkpoint -> dense HF safetensors checkpoint",
      description="Write an Orbax checkpoint (a converted one, or a training run's workdir/checkpoints) as a "
                  "dense Hugging Face checkpoint that transformers' from_pretrained loads.")
  exp.add_argument("--checkpoint", required=True, metavar="CKPT_DIR",
                   help="Orbax checkpoint folder (from `import`, or a run's workdir/checkpoints; local or gs://)")
  exp.add_argument("--step", type=int, default=None, help="step to export (default: the latest)")
  exp.add_argument("--out", required=True, metavar="HF_DIR", help="folder for the HF checkpoint (local or gs://)")
  exp.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written tensors (default: %(default)s)")
  exp.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID",
                   help="copy this tokenizer (folder or Hub id) into HF_DIR")
  exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: %(default)s)")
  exp.add_argument("--mesh", type=parse_mesh, default={"fsdp": -1}, metavar="AXIS=N,...",
                   help="device mesh to restore into (default: fsdp=-1)")
  exp.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
  exp.set_defaults(func=run_export)
  return parser


def _check_out(path: str, overwrite: bool) -> None:
  storage.refresh(path)
  out = storage.path(path)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f"--out {path} exists and is not a folder")
  if storage.listdir(path) and not overwrite:
    raise FileExistsError(f"--out {path} is not empty; pass --overwrite to write into it")


def _orbax_steps(path: str) -> list[str]:
  """The step folders of an Orbax checkpoint folder; refuses a folder that holds anything else."""
  entries = storage.listdir(path)
  steps = [e for e in entries if re.fullmatch(r"\d+(\.orbax-checkpoint-tmp.*)?", e)
           and storage.path(storage.join(path, e)).is_dir()]
  others = sorted(set(entries) - set(steps))
  if others:
    raise FileExistsError(f"--out {path} holds more than checkpoint steps ({', '.join(others[:5])}); "
                          "not deleting anything there, choose another --out")
  return steps


# The commands import jax and the model code when they run, so --help and flag errors answer at once.
def run_import(args) -> None:
  from numina_jax.checkpoint import save_params
  from numina_jax.hf.load import load_pretrained_params
  from numina_jax.sharding import make_mesh

  _check_out(args.out, args.overwrite)
  stale = _orbax_steps(args.out)
  mesh = make_mesh(args.mesh)
  params, cfg = load_pretrained_params(args.hf, args.dtype, mesh, revision=args.revision)
  for step in stale:  # only once the new weights are in hand
    storage.rmtree(storage.join(args.out, step))
  save_params(args.out, params, cfg)
  n = sum(int(p.size) for p in params.values())
  print(f"wrote {n / 1e9:.3f}B parameters ({args.dtype}) to {args.out}")


def run_export(args) -> None:
  from numina_jax.checkpoint import load_model_config, load_params
  from numina_jax.hf.export import parse_size, save_pretrained
  from numina_jax.model.params import param_specs
  from numina_jax.sharding import make_mesh, param_shardings

  parse_size(args.max_shard_size)  # a bad size fails before the restore
  _check_out(args.out, args.overwrite)
  storage.refresh(args.checkpoint)
  if not storage.path(args.checkpoint).is_dir():
    raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such folder")
  cfg = load_model_config(args.checkpoint, args.step)
  shardings = param_shardings(param_specs(cfg), make_mesh(args.mesh))
  params, cfg = load_params(args.checkpoint, step=args.step, shardings=shardings)
  save_pretrained(params, args.out, args.dtype, cfg=cfg, tokenizer=args.tokenizer,
                  max_shard_size=args.max_shard_size, overwrite=args.overwrite)
  print(f"wrote a {args.dtype} HF checkpoint to {args.out}")


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except USER_ERRORS as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"convert {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
