#!/usr/bin/env python
"""Build the demo model family: a tiny char-level Llama base and three skill specialists.

The first-run demo needs parents that a merge search can visibly beat, trained in minutes on a CPU.
What makes merges of models this small pay off (measured on the 2-core machine; reproduce the
numbers with scripts/demo_baselines.py):

* The base must already be *partly* good at every skill. It is trained mostly on copying
  (`cpy: abc =` -> ` abc`, the shared machinery: read the input, emit one character per step, stop)
  plus some examples of each skill, and stopped while it gets only some of each skill right
  (about 15-45% per skill; constant learning rate, no decay: a snapshot in the middle of learning).
  A base that never saw the skills makes every merge score ~0: the specialists then have to build
  each skill from scratch, and those large weight changes interfere.
* Each specialist is a short, low-learning-rate fine-tune of that base on its own skill, *anchored*
  to the base on everything else: half of every batch is its skill (cross-entropy), half is copy and
  the other two skills, where the loss is the KL divergence to the frozen base's predictions. So a
  specialist's weight change improves its skill and does (to first order) nothing else; the three
  task vectors add up instead of fighting. Without the anchor every specialist forgets the other
  skills (0% on them) and every merge scores ~0; replaying the other skills with their true answers
  instead would teach them to every specialist (all parents ~95%, nothing left to gain).

Skills (prompt -> answer, the answer ends with the eos token):
    cipher   "cip: abz =" -> " bca"       every letter shifted by one
    reverse  "rev: abc =" -> " cba"
    double   "dbl: abc =" -> " aabbcc"

The evaluation items (eval_tasks/data/*.jsonl, written by `--write-tasks`) come from a fixed seed,
independent of the family seed, and no string that appears in them is ever used as a training input.

Usage:
    python scripts/make_demo_family.py --out DIR [--seed N] [--quick] [--force]
    python scripts/make_demo_family.py --write-tasks [--tasks-dir eval_tasks]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# Bump whenever anything that changes the trained weights changes: cached families are rebuilt.
RECIPE_VERSION = 3

SKILLS = ("cipher", "reverse", "double")
PREFIX = {"copy": "cpy", "cipher": "cip", "reverse": "rev", "double": "dbl"}
LETTERS = string.ascii_lowercase
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
VOCAB = SPECIALS + list(" :=" + LETTERS)
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}

MIN_LEN, MAX_LEN = 3, 8  # letters per input, for training and evaluation alike

# Evaluation splits: fixed content, independent of the family seed, committed in eval_tasks/data.
TASKS_VERSION = 1  # bump when the evaluation items or the task YAMLs change
EVAL_SEED = 1234
SPLIT_SIZES = {"fit": 60, "heldout": 100}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS_DIR = REPO_ROOT / "eval_tasks"
MANIFEST = "family.json"


@dataclass(frozen=True)
class Recipe:
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    intermediate: int = 256
    batch: int = 64
    # Base: copy-heavy mix; reverse is the hardest skill, cipher the easiest, hence the shares.
    base_mix: tuple = (("copy", 0.7), ("cipher", 0.05), ("reverse", 0.15), ("double", 0.1))
    base_steps: int = 325
    base_lr: float = 1e-3
    spec_steps: int = 150
    spec_lr: float = 3e-4
    anchor: float = 1.0  # weight of the KL-to-base term on the other tasks


FULL = Recipe()
# For CI: a smaller model and far fewer steps. The parents are weak, but each specialist still
# clearly beats the base on its own skill.
QUICK = Recipe(layers=2, intermediate=128, batch=32, base_steps=250, base_lr=2e-3, spec_steps=150,
               spec_lr=2e-3)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def apply_skill(skill: str, s: str) -> str:
    if skill == "copy":
        return s
    if skill == "cipher":
        return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)
    if skill == "reverse":
        return s[::-1]
    if skill == "double":
        return "".join(c + c for c in s)
    raise ValueError(f"unknown skill {skill!r}")


def make_prompt(skill: str, s: str) -> str:
    # No trailing space: the lm-eval target is " <answer></s>", exactly what the models are
    # trained to emit after the prompt.
    return f"{PREFIX[skill]}: {s} ="


def encode(text: str) -> list[int]:
    """Same ids as the saved tokenizer (checked in build_family), without its per-call overhead."""
    return [TOKEN_ID[c] for c in text]


def prompt_answer_ids(prompt: str, answer: str) -> tuple[list[int], int]:
    """(token ids of bos + prompt + " answer" + eos, number of prompt tokens incl. bos)."""
    head = [BOS_ID] + encode(prompt)
    return head + encode(" " + answer) + [EOS_ID], len(head)


def example_ids(skill: str, s: str) -> tuple[list[int], int]:
    return prompt_answer_ids(make_prompt(skill, s), apply_skill(skill, s))


def _random_string(gen: torch.Generator, max_len: int = MAX_LEN) -> str:
    n = int(torch.randint(MIN_LEN, max_len + 1, (1,), generator=gen))
    return "".join(LETTERS[i] for i in torch.randint(0, 26, (n,), generator=gen).tolist())


def make_eval_items() -> dict[tuple[str, str], list[dict]]:
    """{(skill, split): [{"input", "prompt", "answer"}, ...]}; every input string is unique overall,
    so fitness and held-out items are disjoint within and across skills."""
    gen = torch.Generator().manual_seed(EVAL_SEED)
    seen: set[str] = set()
    items: dict[tuple[str, str], list[dict]] = {}
    for skill in SKILLS:
        for split, n in SPLIT_SIZES.items():
            rows = []
            while len(rows) < n:
                s = _random_string(gen)
                if s in seen:
                    continue
                seen.add(s)
                rows.append({"input": s, "prompt": make_prompt(skill, s), "answer": apply_skill(skill, s)})
            items[(skill, split)] = rows
    return items


def eval_inputs() -> frozenset[str]:
    return frozenset(r["input"] for rows in make_eval_items().values() for r in rows)


class Sampler:
    """Deterministic training batches that never contain an evaluation input."""

    def __init__(self, seed: int, forbidden: frozenset[str], max_len: int = MAX_LEN):
        self.gen = torch.Generator().manual_seed(seed)
        self.forbidden = forbidden
        self.max_len = max_len

    def batch(self, mix: tuple, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`mix`: ((task, probability), ...)."""
        probs = torch.tensor([p for _, p in mix], dtype=torch.float64)
        picks = torch.multinomial(probs, size, replacement=True, generator=self.gen).tolist()
        seqs, starts = [], []
        for k in picks:
            s = _random_string(self.gen, self.max_len)
            while s in self.forbidden:  # the guarantee that no evaluation item is trained on
                s = _random_string(self.gen, self.max_len)
            ids, n_prompt = example_ids(mix[k][0], s)
            seqs.append(ids)
            starts.append(n_prompt)
        return _pad(seqs, starts)


def _pad(seqs: list[list[int]], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the mask of answer tokens (the ones that are predicted and scored).
    Right padding needs no attention mask in a causal model: pads come after every real token."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        answer[i, p : len(s)] = True
    return ids, answer


# ---------------------------------------------------------------------------------------------
# Model, training, scoring
# ---------------------------------------------------------------------------------------------
def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()  # decode without spaces between the characters
    # Prepend <s> like real Llama tokenizers do, so lm-eval (which encodes with the tokenizer's
    # defaults) feeds exactly what the models were trained on.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(recipe: Recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).float()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits that predict tokens 1..n (right padding needs no attention mask in a causal model)."""
    return model(input_ids=ids).logits[:, :-1]


def _ce_loss(model, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the answer tokens only: the prompt is given, not predicted."""
    target = ids[:, 1:].masked_fill(~answer[:, 1:], -100)
    logits = _logits(model, ids)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)


def _kl_loss(model, teacher, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) over the answer positions: stay what the teacher was on these inputs."""
    mask = answer[:, 1:]
    with torch.no_grad():
        target = F.log_softmax(_logits(teacher, ids)[mask], -1)
    return F.kl_div(F.log_softmax(_logits(model, ids)[mask], -1), target, log_target=True,
                    reduction="batchmean")


def train(model, loss_fn, steps: int, lr: float, desc: str, warmup: int = 0) -> None:
    """AdamW on `loss_fn()`, linear warm-up then a constant learning rate.

    No weight decay: it would move every weight and add noise to the task vectors. No decay of the
    learning rate either: the base is meant to stop half-way, and a specialist's fine-tune is short."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def score(model, rows: list[dict]) -> float:
    """Exact-match accuracy: 1 when " answer</s>" is the greedy continuation of the prompt.

    The same test as lm-eval's `loglikelihood` + `acc` (is_greedy), in one batched forward pass."""
    seqs, starts = zip(*(prompt_answer_ids(r["prompt"], r["answer"]) for r in rows))
    ids, answer = _pad(list(seqs), list(starts))
    pred = _logits(model, ids).argmax(-1)
    ok = (pred == ids[:, 1:]) | ~answer[:, 1:]
    return ok.all(dim=1).float().mean().item()


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
def _manifest(seed: int, quick: bool, recipe: Recipe) -> dict:
    return {"recipe_version": RECIPE_VERSION, "seed": seed, "quick": quick, "recipe": asdict(recipe),
            "members": ["base", *SKILLS]}


def _cached(out_dir: Path, want: dict) -> bool:
    try:
        have = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    have.pop("build_seconds", None)
    return have == json.loads(json.dumps(want)) and all(
        (out_dir / m / f).is_file()
        for m in want["members"] for f in ("config.json", "model.safetensors", "tokenizer.json")
    )


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # Name the generic fast class (not transformers 5's "TokenizersBackend") so the folder also
    # loads with transformers 4.x.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _train_family(recipe: Recipe, seed: int, paths: dict[str, Path]) -> None:
    """The base, then each specialist from it (see the module docstring for why this recipe)."""
    tokenizer = make_tokenizer()
    probe = make_prompt("reverse", "abc") + " cba</s>"
    assert tokenizer.encode(probe) == [BOS_ID] + encode(probe[: -len("</s>")]) + [EOS_ID]

    forbidden = eval_inputs()
    torch.manual_seed(seed)
    base = make_model(recipe)
    sampler = Sampler(seed, forbidden)
    train(base, lambda: _ce_loss(base, *sampler.batch(recipe.base_mix, recipe.batch)),
          recipe.base_steps, recipe.base_lr, desc="base", warmup=30)
    _save(base, tokenizer, paths["base"])

    teacher = copy.deepcopy(base).requires_grad_(False)
    half = recipe.batch // 2
    for i, skill in enumerate(SKILLS):
        model = copy.deepcopy(teacher).requires_grad_(True)
        own = ((skill, 1.0),)
        keep = tuple((t, 1.0) for t in ("copy", *SKILLS) if t != skill)
        # Its own data stream per specialist: the order they are built in does not matter.
        spec_sampler = Sampler(seed * 1000 + 17 + i, forbidden)

        def loss_fn(model=model, own=own, keep=keep, spec_sampler=spec_sampler):
            return (_ce_loss(model, *spec_sampler.batch(own, half))
                    + recipe.anchor * _kl_loss(model, teacher, *spec_sampler.batch(keep, half)))

        train(model, loss_fn, recipe.spec_steps, recipe.spec_lr, desc=skill)
        _save(model, tokenizer, paths[skill])


def build_family(out_dir, seed: int = 0, quick: bool = False, force: bool = False) -> dict[str, Path]:
    """Train (or reuse) the family under `out_dir`; returns {"base": path, "cipher": path, ...}.
    Deterministic given (seed, quick, RECIPE_VERSION)."""
    recipe = QUICK if quick else FULL
    return build_cached(out_dir, _manifest(seed, quick, recipe),
                        lambda paths: _train_family(recipe, seed, paths), force)


def build_cached(out_dir, want: dict, train, force: bool = False) -> dict[str, Path]:
    """{member: folder} for the manifest `want`, trained by `train(paths)` unless a folder whose
    manifest matches is there. The manifest is written last, so an interrupted build is never
    mistaken for a complete one."""
    out_dir = Path(out_dir)
    paths = {m: out_dir / m for m in want["members"]}
    if not force and _cached(out_dir, want):
        return paths

    t0 = time.time()
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for p in paths.values():
        if p.exists():
            shutil.rmtree(p)
    out_dir.mkdir(parents=True, exist_ok=True)

    # One thread: the model is so small that a second thread gains little, while on a busy machine
    # (Ray workers, other jobs) every op's barrier waits for a descheduled thread — measured 5 s
    # per step with two threads at load 8 on 2 cores. A fixed thread count also keeps the
    # floating-point reduction order (hence the weights) identical from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(paths)
    finally:
        torch.set_num_threads(threads)

    want = {**want, "build_seconds": round(time.time() - t0, 1)}
    (out_dir / MANIFEST).write_text(json.dumps(want, indent=2) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------
# lm-eval tasks
# ---------------------------------------------------------------------------------------------
TASK_TEMPLATE = """\
# Generated by scripts/make_demo_family.py --write-tasks; do not edit by hand.
task: {task}
custom_dataset: !function demo_data.load
dataset_kwargs:
  data_file: {task}.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
# lm-eval 0.4.13 ignores target_delimiter for loglikelihood requests, so the space is in the target
# (and the delimiter is empty so that few-shot contexts do not get a second space).
target_delimiter: ""
doc_to_target: " {{{{answer}}}}</s>"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

# A compositional task (scripts/make_stage_family.py) also reports the mean log-likelihood of the
# whole answer (lm-eval's `perplexity` metric with mean aggregation): a smooth fitness where exact
# match is all zeros.
COMPOSITION_TEMPLATE = TASK_TEMPLATE.replace("""    higher_is_better: true
metadata""", """    higher_is_better: true
  - metric: perplexity        # per item: the answer's log-likelihood; mean: their average
    aggregation: mean
    higher_is_better: true
metadata""")

GROUP_TEMPLATE = """\
# Generated by scripts/make_demo_family.py --write-tasks; do not edit by hand.
group: {group}
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: false
metadata:
  version: {version}
"""


def write_tasks(tasks_dir: Path = DEFAULT_TASKS_DIR) -> list[Path]:
    """Write the JSONL data and task/group YAMLs (deterministic: rerunning changes nothing)."""
    tasks_dir = Path(tasks_dir)
    data_dir = tasks_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    items = make_eval_items()
    for (skill, split), rows in items.items():
        task = f"demo_{skill}_{split}"
        f = data_dir / f"{task}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        y = tasks_dir / f"{task}.yaml"
        y.write_text(TASK_TEMPLATE.format(task=task, version=TASKS_VERSION))
        written += [f, y]
    for split in SPLIT_SIZES:
        y = tasks_dir / f"demo_{split}.yaml"
        tasks = "".join(f"  - demo_{skill}_{split}\n" for skill in SKILLS)
        y.write_text(GROUP_TEMPLATE.format(group=f"demo_{split}", tasks=tasks.rstrip("\n"),
                                           version=TASKS_VERSION))
        written.append(y)
    return written


def load_rows(task: str, tasks_dir: Path = DEFAULT_TASKS_DIR) -> list[dict]:
    return [json.loads(line) for line in (Path(tasks_dir) / "data" / f"{task}.jsonl").read_text().splitlines()]


def family_cli(argv, doc: str, members: str, write, build, quick: bool = True,
               report=lambda paths: None) -> None:
    """The command line of a family script: --out DIR builds (or reuses) it, --write-tasks
    writes its lm-eval tasks; `report(paths)` prints anything more about a built family."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help=f"folder for the family ({members})")
    ap.add_argument("--seed", type=int, default=0)
    if quick:
        ap.add_argument("--quick", action="store_true", help="small fast family (for tests)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a matching family exists")
    ap.add_argument("--write-tasks", action="store_true", help="(re)write the lm-eval task data and YAMLs")
    ap.add_argument("--tasks-dir", type=Path, default=DEFAULT_TASKS_DIR)
    args = ap.parse_args(argv)
    if not args.out and not args.write_tasks:
        ap.error("give --out DIR and/or --write-tasks")
    if args.write_tasks:
        for p in write(args.tasks_dir):
            print(p)
    if args.out:
        t0 = time.time()
        extra = {"quick": args.quick} if quick else {}
        paths = build(args.out, seed=args.seed, force=args.force, **extra)
        print(f"family ready in {time.time() - t0:.1f}s:")
        for name, p in paths.items():
            print(f"  {name:8s} {p}")
        report(paths)


def main(argv=None) -> None:
    family_cli(argv, __doc__, "base/, cipher/, reverse/, double/", write_tasks, build_family)


if __name__ == "__main__":
    main()
