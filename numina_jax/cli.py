"""Flag types shared by the argparse CLIs (convert, evaluate); light, so `--help` starts no JAX backend."""

from __future__ import annotations

import argparse


def parse_mesh(text: str) -> dict[str, int]:
  """`fsdp=4,tensor=2` -> {"fsdp": 4, "tensor": 2}: the `--mesh` flag of the CLIs (an argparse type; the axis
  names and sizes are checked by `numina_jax.sharding.make_mesh`)."""
  out = {}
  for part in filter(None, text.split(",")):
    name, sep, size = part.partition("=")
    if not sep:
      raise argparse.ArgumentTypeError(f"mesh entries look like fsdp=4, got {part!r}")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      raise argparse.ArgumentTypeError(f"mesh size for {name!r} must be an integer, got {size!r}") from None
  return out
