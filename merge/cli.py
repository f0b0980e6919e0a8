"""`mergekit-yaml CONFIG OUT_DIR [options]` — the one-shot merge.

Kept light at import time: torch and transformers load only once a merge actually runs, so `--help`
answers at once.
"""
from __future__ import annotations

import sys
from typing import NoReturn

import click

from merge.errors import EvomergeError


def fail(message: str) -> NoReturn:
    """Every user-facing error: one line on stderr, exit code 2, no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--cuda", is_flag=True, help="Merge on the GPU (same as --device cuda).")
@click.option("--device", default=None, help="Device for the merge arithmetic: cpu, cuda, cuda:1 ...")
@click.option("--out-shard-size", default="5B", show_default=True,
              help="Largest output shard, e.g. 5B, 500M, or bytes.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the base (or first) model's tokenizer into the output.")
@click.option("--allow-crimes", is_flag=True, help="Allow mixing different architectures.")
@click.option("--truncate-vocab", is_flag=True,
              help="Merge models with different vocabularies by cutting to the smallest "
                   "(prefer tokenizer_source in the config).")
@click.option("--lazy-unpickle", is_flag=True, help="Accepted for compatibility; loading is always lazy.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder.")
@click.option("--random-seed", type=int, default=None, help="Seed for random methods (DARE, DELLA).")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True)
@click.option("--clone-tensors", is_flag=True, help="Copy each input tensor after reading it.")
@click.option("--num-threads", type=click.IntRange(min=1), default=None,
              help="Torch threads for the arithmetic.")
@click.option("--dry-run", is_flag=True, help="Validate, print the plan, load no tensor.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("-v", "--verbose", is_flag=True, help="Print the plan before merging.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cli(config_file, out_dir, cuda, device, out_shard_size, copy_tokenizer, allow_crimes,
        truncate_vocab, lazy_unpickle, trust_remote_code, random_seed, write_model_card, clone_tensors,
        num_threads, dry_run, overwrite, verbose, quiet):
    """Merge the models that CONFIG describes into OUT_DIR (a Hugging Face model folder)."""
    from merge.config import load_config
    from merge.writer import check_output_folder, parse_size

    try:
        options = _options(cuda, device, out_shard_size, copy_tokenizer, allow_crimes,
                           trust_remote_code, random_seed, write_model_card, clone_tensors,
                           num_threads, overwrite, quiet, parse_size)
        options.truncate_vocab = truncate_vocab
        config = load_config(config_file)
        if not dry_run:
            check_output_folder(out_dir, overwrite, [])
        from merge.engine import merge_to_folder, validate

        plan = validate(config, options)
        if dry_run or verbose:
            click.echo(plan.summary())
        if dry_run:
            return
        merge_to_folder(config, out_dir, options, plan=plan)
    except EvomergeError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written to OUT_DIR")
    if not quiet:
        click.echo(f"wrote {out_dir}")


def _options(cuda, device, out_shard_size, copy_tokenizer, allow_crimes, trust_remote_code,
             random_seed, write_model_card, clone_tensors, num_threads, overwrite, quiet,
             parse_size):
    from merge.engine import MergeOptions

    if cuda and device and not device.startswith("cuda"):
        raise EvomergeError(f"--cuda conflicts with --device {device}; give one of them")
    return MergeOptions(device=device or ("cuda" if cuda else "cpu"), random_seed=random_seed,
                        out_shard_size=parse_size(out_shard_size), copy_tokenizer=copy_tokenizer,
                        write_model_card=write_model_card, overwrite=overwrite, quiet=quiet,
                        num_threads=num_threads, trust_remote_code=trust_remote_code,
                        allow_crimes=allow_crimes, clone_tensors=clone_tensors)


def main() -> None:
    cli(prog_name="mergekit-yaml")
