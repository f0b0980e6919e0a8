"""`mergekit-legacy`: the flag-style merge command line, translated into a merge config.

    mergekit-legacy OUT --base-model B --merge M1 --merge M2 --weight 0.5 --density 0.5
    mergekit-legacy OUT --bakllama LAYERS.yml        (a bakllama layer-slice file)

Both build an ordinary merge config and run it through the engine; `--print-yaml` prints that config
(exactly what `mergekit-yaml` accepts) and exits without merging.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import click

from merge.errors import EvomergeError

# Tensors that write into the residual stream: scaling them by s scales a layer's contribution by s.
RESIDUAL_WRITERS = ("o_proj", "down_proj")


def _spread(values: tuple[float, ...], n: int, flag: str) -> list[Optional[float]]:
    if not values:
        return [None] * n
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise EvomergeError(f"{flag}: got {len(values)} values for {n} models; give one value "
                            f"for all, or one per model in --merge order")
    return list(values)


def flags_to_config(merge: tuple[str, ...], base_model: Optional[str], method: str,
                    weight: tuple[float, ...], density: tuple[float, ...],
                    normalize: Optional[bool], naive_count: bool, bf16: bool) -> dict[str, Any]:
    from merge.methods import get_method

    if not merge:
        raise EvomergeError("--merge: give at least one model to merge (or --bakllama FILE)")
    m = get_method(method.strip().lower())
    if naive_count:
        raise EvomergeError("--naive-count: sign election by count is not available; drop the "
                            "flag (TIES elects signs by weighted magnitude)")
    models = list(merge)
    if base_model and not m.takes_base and base_model not in models:
        models.append(base_model)   # a method without a base merges the base like any model
    params: dict[str, Any] = {}
    entries: list[dict[str, Any]] = [{"model": ref} for ref in models]
    if m.name == "slerp":
        if len(weight) != 1:
            raise EvomergeError("--weight: slerp takes exactly one --weight, the interpolation "
                                "position t (0 = base model)")
        params["t"] = weight[0]
        if density:
            raise EvomergeError("--density: slerp has no density; drop the flag")
    else:
        if "weight" in m.params:
            for e, w in zip(entries, _spread(weight or (1.0,), len(entries), "--weight")):
                e["parameters"] = {"weight": w}
        elif weight:
            raise EvomergeError(f"--weight: {m.name} takes no per-model weight; drop the flag")
        if density:
            if "density" not in m.params:
                raise EvomergeError(f"--density: {m.name} has no density; drop the flag or use "
                                    f"--method ties")
            for e, d in zip(entries, _spread(density, len(entries), "--density")):
                e.setdefault("parameters", {})["density"] = d
    if normalize is not None:
        if "normalize" not in m.params:
            raise EvomergeError(f"--normalize/--no-normalize: {m.name} has no normalize setting")
        params["normalize"] = normalize
    config: dict[str, Any] = {"merge_method": m.name}
    if base_model:
        config["base_model"] = base_model
    config["models"] = entries
    if params:
        config["parameters"] = params
    if bf16:
        config["dtype"] = "bfloat16"
    return config


def bakllama_to_config(path: str, fp16: bool) -> dict[str, Any]:
    """A bakllama file's layer slices as passthrough slices (end is exclusive, as in range())."""
    import yaml
    from pydantic import BaseModel, ConfigDict, ValidationError

    from merge.config import _one_line
    from merge.errors import ConfigError

    class LayerSlice(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str
        start: int
        end: int
        scale: Optional[float] = None

    class Bakllama(BaseModel):
        model_config = ConfigDict(extra="forbid")
        layer_slices: list[LayerSlice]
        embedding_source: Optional[str] = None
        lm_head_source: Optional[str] = None

    if not os.path.isfile(path):
        raise EvomergeError(f"--bakllama: no such file '{path}'")
    try:
        raw = yaml.safe_load(open(path).read())
        cfg = Bakllama.model_validate(raw)
    except yaml.YAMLError as e:
        raise EvomergeError(f"--bakllama: '{path}' is not valid YAML "
                            f"({getattr(e, 'problem', None) or 'syntax'})") from None
    except ValidationError as e:
        err = _one_line(e)
        raise ConfigError(f"{path}: {err.field}", str(err).split(": ", 1)[-1]) from None
    if not cfg.layer_slices:
        raise EvomergeError(f"--bakllama: '{path}' lists no layer_slices")
    slices = []
    for i, s in enumerate(cfg.layer_slices):
        if s.start < 0 or s.end <= s.start:
            raise EvomergeError(f"--bakllama: layer_slices[{i}]: start {s.start}, end {s.end} is "
                                f"empty; end is exclusive and must exceed start")
        src: dict[str, Any] = {"model": s.model, "layer_range": [s.start, s.end]}
        if s.scale is not None:
            src["parameters"] = {"scale": [{"filter": f, "value": s.scale}
                                           for f in RESIDUAL_WRITERS]}
        slices.append({"sources": [src]})
    first, last = cfg.layer_slices[0].model, cfg.layer_slices[-1].model
    if cfg.embedding_source and cfg.embedding_source != first:
        raise EvomergeError(f"--bakllama: embedding_source '{cfg.embedding_source}' must be the "
                            f"first slice's model ('{first}'): embeddings come from the first "
                            f"slice; reorder the slices or drop the key")
    if cfg.lm_head_source and cfg.lm_head_source != last:
        raise EvomergeError(f"--bakllama: lm_head_source '{cfg.lm_head_source}' must be the last "
                            f"slice's model ('{last}'): the head comes from the last slice")
    config: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if fp16:
        config["dtype"] = "float16"
    return config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out_path", metavar="OUT_PATH", type=click.Path(file_okay=False))
@click.option("--merge", "merge_", multiple=True, metavar="MODEL", help="A model to merge (repeatable).")
@click.option("--base-model", default=None, help="Base model of the merge.")
@click.option("--method", default="ties", show_default=True, help="Merge method.")
@click.option("--weight", multiple=True, type=float,
              help="Weight: one for all models or one per --merge (default 1.0; slerp: t).")
@click.option("--density", multiple=True, type=float,
              help="Fraction of each task vector kept: one for all or one per --merge.")
@click.option("--normalize/--no-normalize", default=None,
              help="Divide by the sum of weights (default: the method's own default).")
@click.option("--naive-count", is_flag=True, help="Not supported (reported as an error).")
@click.option("--int8-mask", is_flag=True, help="Accepted for compatibility; no effect.")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="Merge in bfloat16.")
@click.option("--bakllama", "bakllama", default=None, metavar="FILE",
              help="Build from a bakllama layer-slice file instead of --merge flags.")
@click.option("--fp16", is_flag=True, help="With --bakllama: write float16.")
@click.option("--print-yaml", is_flag=True, help="Print the merge config and exit without merging.")
@click.option("--cuda", is_flag=True, help="Merge on the GPU.")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True)
@click.option("--allow-crimes", is_flag=True, help="Allow mixing different architectures.")
@click.option("--lazy-unpickle", is_flag=True, help="Accepted for compatibility; loading is always lazy.")
@click.option("--clone-tensors", is_flag=True, help="Copy each input tensor after reading it.")
@click.option("--random-seed", type=int, default=None, help="Seed for random methods.")
@click.option("--out-shard-size", default="5B", show_default=True, help="Largest output shard.")
@click.option("--cache-dir", default=None, help="Hugging Face cache folder for hub models.")
@click.option("--merged-cache-dir", default=None, help="Accepted for compatibility; LoRA inputs "
                                                         "are applied on the fly, nothing is cached.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def cli(out_path, merge_, base_model, method, weight, density, normalize, naive_count, int8_mask,
        bf16, bakllama, fp16, print_yaml, cuda, copy_tokenizer, allow_crimes, lazy_unpickle,
        clone_tensors, random_seed, out_shard_size, cache_dir, merged_cache_dir, overwrite, quiet):
    """Merge with legacy-style flags (or a bakllama file) into OUT_PATH."""
    from merge.command import options, reporting, run_build

    if cache_dir:   # before huggingface_hub is imported: it reads the variable once
        os.environ["HF_HUB_CACHE"] = cache_dir

    def load():
        from merge.config import MergeConfig

        if bakllama:
            if merge_ or base_model:
                raise EvomergeError("--bakllama: give either a bakllama file or --merge/"
                                    "--base-model flags, not both")
            data = bakllama_to_config(bakllama, fp16)
        else:
            data = flags_to_config(merge_, base_model, method, weight, density, normalize,
                                   naive_count, bf16)
        return MergeConfig.from_dict(data)   # the same validation mergekit-yaml applies

    if print_yaml:
        import yaml

        with reporting("OUT_PATH"):
            click.echo(yaml.safe_dump(load().to_dict(), sort_keys=False), nl=False)
        return

    def make_options():
        return options(cuda, None, out_shard_size, random_seed=random_seed,
                       copy_tokenizer=copy_tokenizer, overwrite=overwrite, quiet=quiet,
                       allow_crimes=allow_crimes, clone_tensors=clone_tensors)

    def plan(config, opts):
        from merge.engine import validate

        return validate(config, opts)

    def build(config, opts, the_plan):
        from merge.engine import merge_to_folder

        merge_to_folder(config, out_path, opts, plan=the_plan)

    run_build(out_path, load=load, plan=plan, build=build, make_options=make_options,
              target="OUT_PATH")


def main() -> None:
    cli(prog_name="mergekit-legacy")
