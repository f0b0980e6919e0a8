"""`mergekit-moe CONFIG OUT_DIR [options]` — assemble a mixture-of-experts model."""
from __future__ import annotations

import click

from merge.command import options, run_build


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.argument("out_dir", metavar="OUT_DIR", type=click.Path(file_okay=False))
@click.option("--cuda", is_flag=True, help="Run the prompts through the base model on the GPU.")
@click.option("--device", default=None, help="Device for the gate computation: cpu, cuda, cuda:1 ...")
@click.option("--out-shard-size", default="5B", show_default=True,
              help="Largest output shard, e.g. 5B, 500M, or bytes.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the base model's tokenizer into the output.")
@click.option("--random-seed", type=int, default=None, help="Seed for gate_mode: random.")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True)
@click.option("--lazy-unpickle", is_flag=True, help="Accepted for compatibility; loading is always lazy.")
@click.option("--i-understand-this-is-not-useful-without-training", "all_same_ok", is_flag=True,
              help="Accepted for compatibility: identical experts are never refused here.")
@click.option("--dry-run", is_flag=True, help="Validate, print the layout, load no tensor.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("-v", "--verbose", is_flag=True, help="Print the layout before building.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cli(config_file, out_dir, cuda, device, out_shard_size, copy_tokenizer, random_seed,
        write_model_card, lazy_unpickle, all_same_ok, dry_run, overwrite, verbose, quiet):
    """Build a mixture-of-experts model from the dense models CONFIG lists into OUT_DIR."""

    def make_options():
        return options(cuda, device, out_shard_size, random_seed=random_seed,
                       copy_tokenizer=copy_tokenizer, write_model_card=write_model_card,
                       overwrite=overwrite, quiet=quiet)

    def load():
        from merge.moe.config import load_moe_config

        return load_moe_config(config_file)

    def plan(config, opts):
        from merge.moe.build import plan_moe

        return plan_moe(config)

    def build(config, opts, the_plan):
        from merge.moe.build import build_moe

        build_moe(config, out_dir, opts, plan=the_plan)

    run_build(out_dir, load=load, plan=plan, build=build, make_options=make_options,
              dry_run=dry_run, verbose=verbose)


def main() -> None:
    cli(prog_name="mergekit-moe")
