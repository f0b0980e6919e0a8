#!/usr/bin/env python
"""Build the staged demo family: a data-flow search can chain its specialists, a weight merge cannot.

The data-flow demo (scripts/demo.py --dataflow) asks for a composition of two skills that no member
of the family was trained for. A path through layers can compute f(g(x)) only if one model's layers
hand the next model's layers a hidden state in the format they read. This family is built so that
they do (the 4-layer demo family of make_demo_family.py is not: 84 hand-made splices of it scored 0
on every composition tried).

* The base (6 layers) learns to copy (`map: abc =` -> ` abc`), with stochastic depth: on a quarter
  of the steps a random layer set is skipped or repeated, on another quarter the middle layer
  (MAP_LAYER) is left out. So every layer reads and writes one residual-stream format, and the
  model works with or without its middle layer.
* Each specialist is the base with *only* its middle layer trained, on one per-letter map (cipher:
  shift by one; atbash: a<->z, b<->y, ...). Besides the cross-entropy of its answers, a *stage*
  loss asks that the layer's output equal what the base's stream would be at that point had the
  input already been mapped: h_spec(after MAP_LAYER | s) ~ h_base(before MAP_LAYER | f(s)), at every
  position. The layer becomes a stage: base format in, base format out, the letters mapped. Half
  of the steps run it inside a random path of base layers (skips, repeats, the later layers
  first), so it also reads the stream those paths make.

The composition (cipher, then atbash: `map: abc =` -> ` yxw`) is no member's skill. The base and
both parents score 0 on it, a task-arithmetic merge of the two middle layers scores 0 too (the
two maps blend instead of chaining), and the path base[0:3] + cipher[3] + atbash[3] + base[4:6]
computes it: 92% held-out exact match (87% without the random paths of the stage training).

Usage:
    python scripts/make_stage_family.py --out DIR [--seed N] [--force]
    python scripts/make_stage_family.py --write-tasks [--tasks-dir eval_tasks]
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from make_demo_family import (COMPOSITION_TEMPLATE, DEFAULT_TASKS_DIR, LETTERS, MAX_LEN, MIN_LEN,
                              PAD_ID, SPLIT_SIZES, TASK_TEMPLATE, _pad, _save, build_cached,
                              family_cli, make_model, make_tokenizer, prompt_answer_ids)
from make_demo_family import Recipe as ModelShape

RECIPE_VERSION = 2          # bump whenever anything that changes the trained weights changes
TASKS_VERSION = 1
EVAL_SEED = 4321            # the evaluation items: fixed, independent of the family seed
SKILLS = ("cipher", "atbash")
COMPOSITION = "cipatb"      # cipher, then atbash
COMPOSED = ("cipher", "atbash")


def apply_map(skill: str, s: str) -> str:
    if skill == "copy":
        return s
    if skill == "cipher":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)
    if skill == "atbash":
        return "".join(LETTERS[25 - LETTERS.index(c)] for c in s)
    if skill == COMPOSITION:
        for step in COMPOSED:
            s = apply_map(step, s)
        return s
    raise ValueError(f"unknown skill {skill!r}")


def make_prompt(s: str) -> str:
    return f"map: {s} ="    # one prompt for every skill: a member is the function it computes


@dataclass(frozen=True)
class Recipe:
    shape: ModelShape = ModelShape(layers=6, hidden=64, heads=4, intermediate=256)
    map_layer: int = 3
    batch: int = 64
    base_steps: int = 600
    base_lr: float = 1e-3
    p_skip: float = 0.15        # stochastic depth of the base: per layer, skip ...
    p_repeat: float = 0.1       # ... or run twice
    spec_steps: int = 400
    spec_lr: float = 1e-3
    stage: float = 3.0          # weight of the stage loss


RECIPE = Recipe()


# --- data -----------------------------------------------------------------------------------------
def _strings(gen: random.Random, n: int, forbidden: frozenset = frozenset()) -> list[str]:
    out = []
    while len(out) < n:
        s = "".join(gen.choice(LETTERS) for _ in range(gen.randint(MIN_LEN, MAX_LEN)))
        if s not in forbidden:
            out.append(s)
    return out


def make_eval_items() -> dict[tuple[str, str], list[dict]]:
    """{(skill, split): rows} for both maps and the composition; every input string is unique
    overall, so splits (and tasks) never share an item."""
    gen = random.Random(EVAL_SEED)
    seen: set[str] = set()
    items = {}
    for skill in (*SKILLS, COMPOSITION):
        for split, n in SPLIT_SIZES.items():
            rows = []
            while len(rows) < n:
                s = _strings(gen, 1)[0]
                if s not in seen:
                    seen.add(s)
                    rows.append({"input": s, "prompt": make_prompt(s),
                                 "answer": apply_map(skill, s)})
            items[(skill, split)] = rows
    return items


def eval_inputs() -> frozenset[str]:
    return frozenset(r["input"] for rows in make_eval_items().values() for r in rows)


def batch(skill: str, strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, starts = zip(*(prompt_answer_ids(make_prompt(s), apply_map(skill, s)) for s in strings))
    return _pad(list(seqs), list(starts))


# --- forward passes over a layer path -------------------------------------------------------------
def run_path(model, ids: torch.Tensor, path: list[int], capture_before: int = -1):
    """(logits predicting tokens 1..n, the hidden state entering path position `capture_before`)
    for the model with its layers taken in the order `path` (indices may repeat)."""
    inner, n = model.model, model.config.num_hidden_layers
    saved = inner.layers
    inner.layers = nn.ModuleList([saved[i] for i in path])
    model.config.num_hidden_layers = len(path)
    seen = {}
    hook = None
    if capture_before >= 0:
        def grab(module, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]
        hook = inner.layers[capture_before].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    finally:
        if hook is not None:
            hook.remove()
        inner.layers, model.config.num_hidden_layers = saved, n
    return logits, seen.get("h")


def _ce(logits, ids, answer):
    target = ids[:, 1:].masked_fill(~answer[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                           ignore_index=-100)


def _random_path(gen: random.Random, recipe: Recipe) -> list[int]:
    path = []
    for i in range(recipe.shape.layers):
        if gen.random() < recipe.p_skip:
            continue
        path += [i, i] if gen.random() < recipe.p_repeat else [i]
    return path or [0]


def _stage_path(gen: random.Random, recipe: Recipe) -> tuple[list[int], int]:
    """A random path through the middle layer once, and its position: base layers before it
    (sometimes a whole model's later layers too) and after it, skipped and repeated at random,
    so that a stage reads the stream of any such path (a data-flow candidate's, above all)."""
    mid = recipe.map_layer
    before = [i for i in _random_path(gen, recipe) if i < mid] or [0]
    if gen.random() < 0.3:
        before += list(range(mid + 1, recipe.shape.layers))
    after = [i for i in _random_path(gen, recipe) if i > mid]
    return before + [mid] + after, len(before)


@torch.no_grad()
def exact_match(model, rows: list[dict], path: list[int] = None) -> float:
    """Greedy exact match of " answer</s>" (lm-eval's `acc` for these tasks), one forward pass."""
    path = list(range(model.config.num_hidden_layers)) if path is None else path
    seqs, starts = zip(*(prompt_answer_ids(r["prompt"], r["answer"]) for r in rows))
    ids, answer = _pad(list(seqs), list(starts))
    pred = run_path(model, ids, path)[0].argmax(-1)
    return ((pred == ids[:, 1:]) | ~answer[:, 1:]).all(dim=1).float().mean().item()


# --- training -------------------------------------------------------------------------------------
def _steps(params, loss_fn, steps: int, lr: float, desc: str) -> None:
    from tqdm.auto import tqdm

    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def _train_family(recipe: Recipe, seed: int, paths: dict[str, Path]) -> None:
    tokenizer = make_tokenizer()
    forbidden = eval_inputs()
    gen = random.Random(seed)
    full = list(range(recipe.shape.layers))
    without_map = [i for i in full if i != recipe.map_layer]
    torch.manual_seed(seed)
    base = make_model(recipe.shape)

    def base_loss(step):
        ids, answer = batch("copy", _strings(gen, recipe.batch, forbidden))
        path = (_random_path(gen, recipe) if step % 4 == 0 else
                without_map if step % 4 == 1 else full)
        return _ce(run_path(base, ids, path)[0], ids, answer)

    base.train()
    _steps(base.parameters(), base_loss, recipe.base_steps, recipe.base_lr, "base (copy)")
    base.eval().requires_grad_(False)
    _save(base, tokenizer, paths["base"])

    for skill in SKILLS:
        model = copy.deepcopy(base)
        stage = model.model.layers[recipe.map_layer].requires_grad_(True)

        def spec_loss(step, model=model, skill=skill):
            strings = _strings(gen, recipe.batch, forbidden)
            ids, answer = batch(skill, strings)
            path, at = _stage_path(gen, recipe) if step % 2 else (full, recipe.map_layer)
            # the stage target: the base's stream entering the middle layer, on mapped input
            with torch.no_grad():
                mapped, _ = batch("copy", [apply_map(skill, s) for s in strings])
                _, want = run_path(base, mapped, path, capture_before=at)
            got = {}
            hook = model.model.layers[recipe.map_layer].register_forward_hook(
                lambda m, a, out: got.__setitem__("h", out[0] if isinstance(out, tuple) else out))
            try:
                logits, _ = run_path(model, ids, path)
            finally:
                hook.remove()
            real = (ids != PAD_ID).unsqueeze(-1).float()
            stage_loss = (((got["h"] - want) ** 2) * real).sum() / real.sum() / want.size(-1)
            return _ce(logits, ids, answer) + recipe.stage * stage_loss

        model.train()
        _steps(stage.parameters(), spec_loss, recipe.spec_steps, recipe.spec_lr, skill)
        model.eval()
        _save(model, tokenizer, paths[skill])


def build_stage_family(out_dir, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Train (or reuse) the family under `out_dir`: {"base": path, "cipher": path, "atbash": path}.
    Deterministic given (seed, RECIPE_VERSION)."""
    want = {"recipe_version": RECIPE_VERSION, "kind": "stages", "seed": seed,
            "recipe": asdict(RECIPE), "members": ["base", *SKILLS]}
    return build_cached(out_dir, want, lambda paths: _train_family(RECIPE, seed, paths), force)


# --- lm-eval tasks --------------------------------------------------------------------------------
def task_name(skill: str, split: str) -> str:
    return f"demo_{COMPOSITION}_{split}" if skill == COMPOSITION else f"demo_map_{skill}_{split}"


def write_tasks(tasks_dir: Path = DEFAULT_TASKS_DIR) -> list[Path]:
    """The JSONL data and task YAMLs of both maps and the composition (deterministic)."""
    tasks_dir = Path(tasks_dir)
    (tasks_dir / "data").mkdir(parents=True, exist_ok=True)
    written = []
    for (skill, split), rows in make_eval_items().items():
        task = task_name(skill, split)
        data = tasks_dir / "data" / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        template = COMPOSITION_TEMPLATE if skill == COMPOSITION else TASK_TEMPLATE
        yml = tasks_dir / f"{task}.yaml"
        yml.write_text(template.format(task=task, version=TASKS_VERSION).replace(
            "make_demo_family.py", "make_stage_family.py"))
        written += [data, yml]
    return written


def _report(paths: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    items = make_eval_items()
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        print(f"  {name:8s} held-out exact match: " + ", ".join(
            f"{s} {exact_match(model, items[(s, 'heldout')]):.2f}" for s in (*SKILLS, COMPOSITION)))


def main(argv=None) -> None:
    family_cli(argv, __doc__, "base/, cipher/, atbash/", write_tasks, build_stage_family,
               quick=False, report=_report)


if __name__ == "__main__":
    main()
