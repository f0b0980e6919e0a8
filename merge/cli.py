"""`mergekit-yaml CONFIG OUT_DIR [options]` — the one-shot merge.

Kept light at import time: torch and transformers load only once a merge actually runs, so `--help`
answers at once.
"""
from __future__ import annotations

import click

from merge.command import fail, options, run_build

__all__ = ["cli", "main", "fail"]


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

    def make_options():
        return options(cuda, device, out_shard_size, random_seed=random_seed,
                       copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                       overwrite=overwrite, quiet=quiet, num_threads=num_threads,
                       trust_remote_code=trust_remote_code, allow_crimes=allow_crimes,
                       clone_tensors=clone_tensors, truncate_vocab=truncate_vocab)

    def load():
        from merge.config import load_config

        return load_config(config_file)

    def plan(config, opts):
        from merge.engine import validate

        return validate(config, opts)

    def build(config, opts, the_plan):
        from merge.engine import merge_to_folder

        merge_to_folder(config, out_dir, opts, plan=the_plan)

    run_build(out_dir, load=load, plan=plan, build=build, make_options=make_options,
              dry_run=dry_run, verbose=verbose)


def main() -> None:
    cli(prog_name="mergekit-yaml")
