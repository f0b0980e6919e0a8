"""The differential parity harness: one merge config through the reference toolkit (mergekit 0.1.5,
in a virtual environment of its own) and through our `mergekit-yaml`, outputs compared.

The corpus lives in tests/reference/configs/*.yml. A corpus config names models of the tiny
families below as `FAMILY/MEMBER` (`llama/base`, `qwen2/c1`, `llama-vocab/c2` ...); `resolve`
rewrites them into absolute paths, because the reference takes a relative path such as `llama/c0`
for a hub id and tries to download it. Leading comment lines carry the case's metadata:

    # parity: exact | stats | ulp [N] | ties-cutoff [N]   how outputs are compared (default exact)
    # seed: N                              --random-seed for both tools (default 42)

Criteria (see docs/compatibility.md, "The differential suite"):
- exact (float32 outputs): same tensor names, shapes and dtypes, and for every tensor
  max|ours - ref| <= 1e-5 * max(max|ref|, 1e-6).
- ulp N (half-precision outputs): same names/shapes/dtypes, and every element within N units in
  the last place of the output dtype (ulp taken at max(|ref|, |ours|), floored at the RMS of the
  reference tensor so values near zero are not judged by a vanishing ulp). Default N=8: the
  reference rounds every intermediate to the half dtype, at operand magnitudes of a few RMS.
- ties-cutoff N (half-precision TIES): as ulp N, except at the entries where the two documented
  TIES deviations act (see `cutoff_ties`): a magnitude tie at a model's keep cut-off, or an
  elected sign that half-precision and float32 arithmetic decide differently. Any other entry
  beyond N ulp fails.
- stats (DARE, DELLA: random masks): per tensor, the kept fraction of the merged delta (merged -
  base != 0) and its RMS agree within binomial tolerances; over the whole model the kept fraction
  (binomial, 5 sigma + 0.005) and the mean of the delta agree; and no statistic is shifted
  systematically across tensors: the kept fraction (by > 0.005), the delta RMS (by > 1%) and each
  model's effective weight <delta, tau_i>/<tau_i, tau_i> (by > 1%; what a missing rescale, a wrong
  density or weight changes) are each tested with a paired t-test over the tensors (|t| > 5 fails).
config.json (layer count, dtype, vocabulary size, architectures ...) and the tokenizer (vocabulary,
added tokens, special tokens, chat template) are compared in every mode.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIG_DIR = HERE / "configs"
DEFAULT_REFERENCE_VENV = REPO / ".cache" / "mergekit-0.1.5"
SETUP_SCRIPT = REPO / "scripts" / "setup_reference.sh"
REGISTRY_UNREACHABLE = 3  # scripts/setup_reference.sh's exit code for "cannot reach the registry"
DEFAULT_SEED = 42
RTOL = 1e-5
DEFAULT_MAX_ULP = 8

sys.path.insert(0, str(HERE.parent))  # tests/: tinymodels

CHATML_LIKE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# name -> how to build it. Every family: base + children c0, c1, ... (children = base + noise).
FAMILIES: dict[str, dict] = {
    "llama": dict(arch="llama", children=3),
    "llama-bf16": dict(arch="llama", children=2, dtype="bfloat16"),
    "llama-fp16": dict(arch="llama", children=2, dtype="float16"),
    "mistral": dict(arch="mistral", children=2),
    "qwen2": dict(arch="qwen2", children=3),
    "gemma": dict(arch="gemma", children=2),
    "phi3": dict(arch="phi3", children=2),
    "gpt2": dict(arch="gpt2", children=2),
    # Tokenizer cases: c0 shares the base vocabulary; c1 adds six tokens (and carries a chat
    # template), c2 adds four others; the base embeds 128 rows for its 124 tokens.
    "llama-vocab": dict(arch="llama", children=1, extra={
        "c1": dict(tokens=["<|im_start|>", "<|im_end|>", "tool", "call", "json", "xml"],
                   chat_template=CHATML_LIKE),
        "c2": dict(tokens=["<think>", "</think>", "alpha", "beta"]),
    }),
}
FAMILY_REF = re.compile(r"(?<![\w./-])(?P<family>" +
                  "|".join(sorted(map(re.escape, FAMILIES), key=len, reverse=True)) +
                  r")/(?P<member>base|c\d+)(?![\w./-])")


# --- the corpus ------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    path: Path
    text: str
    parity: str = "exact"
    max_ulp: int = DEFAULT_MAX_ULP
    seed: int = DEFAULT_SEED
    description: str = ""

    @property
    def families(self) -> set[str]:
        return {m["family"] for m in FAMILY_REF.finditer(self.text)}

    def resolve(self, family_root: Path) -> str:
        return resolve(self.text, family_root)


def resolve(text: str, family_root: Path) -> str:
    """The config text with every `FAMILY/MEMBER` replaced by its absolute path."""
    root = Path(family_root).resolve()
    return FAMILY_REF.sub(lambda m: str(root / m["family"] / m["member"]), text)


def read_case(path: Path) -> Case:
    text = Path(path).read_text()
    case = Case(id=Path(path).stem, path=Path(path), text=text)
    notes = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        key, _, value = body.partition(":")
        if key == "parity":
            parts = value.split()
            case.parity = parts[0]
            if len(parts) > 1:
                case.max_ulp = int(parts[1])
        elif key == "seed":
            case.seed = int(value)
        else:
            notes.append(body)
    if case.parity not in ("exact", "stats", "ulp", "ties-cutoff"):
        raise ValueError(f"{path}: parity must be exact, stats, ulp or ties-cutoff, "
                         f"not {case.parity!r}")
    case.description = " ".join(notes)
    return case


def load_corpus(config_dir: Path = CONFIG_DIR) -> list[Case]:
    return [read_case(p) for p in sorted(Path(config_dir).glob("*.yml"))]


# --- tiny families ---------------------------------------------------------------------------
def build_families(root: Path, names) -> Path:
    """Build the named families under `root` (a family already built there is kept)."""
    import torch

    import tinymodels

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no loading/writing bars in the test output
    root = Path(root)
    for name in sorted(names):
        spec = dict(FAMILIES[name])
        done = root / name / ".built"
        if done.exists():
            continue
        extra = spec.pop("extra", {})
        dtype = getattr(torch, spec.pop("dtype", "float32"))
        fam = tinymodels.build_family(root / name, dtype=dtype, **spec)
        for i, (member, how) in enumerate(sorted(extra.items())):
            tinymodels.extend_vocab(fam["base"], root / name / member, how["tokens"],
                                    seed=200 + i, chat_template=how.get("chat_template"))
        done.write_text("ok\n")
    return root


# --- the reference's virtual environment -----------------------------------------------------
class ReferenceUnavailable(Exception):
    def __init__(self, message: str, registry_unreachable: bool):
        super().__init__(message)
        self.registry_unreachable = registry_unreachable


def reference_venv() -> Path:
    return Path(os.environ.get("EVOMERGE_REFERENCE_VENV") or DEFAULT_REFERENCE_VENV)


def ensure_reference() -> Path:
    """The reference venv's python, setting the venv up first if needed (scripts/setup_reference.sh
    is idempotent and instant once done). Raises ReferenceUnavailable."""
    venv = reference_venv()
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mergekit-yaml").exists():
        r = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True,
                           env=dict(os.environ, EVOMERGE_REFERENCE_VENV=str(venv)))
        if r.returncode == REGISTRY_UNREACHABLE:
            raise ReferenceUnavailable(r.stderr.strip().splitlines()[-1], True)
        if r.returncode:
            raise ReferenceUnavailable(
                f"scripts/setup_reference.sh failed (exit {r.returncode}): "
                f"{(r.stderr or r.stdout).strip()[-600:]}", False)
    if not python.exists():
        raise ReferenceUnavailable(f"no reference venv at {venv} (run scripts/setup_reference.sh)",
                                   False)
    check = subprocess.run([str(python), "-c", "import mergekit.merge; print(1)"],
                           capture_output=True, text=True)
    if check.returncode:
        raise ReferenceUnavailable(f"{python} cannot import mergekit: "
                                   f"{check.stderr.strip()[-400:]}", False)
    return python


# --- running both tools ----------------------------------------------------------------------
def _tool_env(tool: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONHASHSEED="0")  # reproducible runs: the reference iterates sets of models
    if tool == "reference":
        env.pop("PYTHONPATH", None)  # nothing of ours on its path
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                             env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@dataclass
class Run:
    """Both tools' outputs for a set of cases."""
    workdir: Path
    family_root: Path
    cases: dict[str, Case]
    results: dict[str, dict[str, dict]] = field(default_factory=dict)  # tool -> id -> result
    seconds: dict[str, float] = field(default_factory=dict)

    def out(self, tool: str, case_id: str) -> Path:
        return self.workdir / tool / case_id


def run_cases(cases: list[Case], workdir: Path, family_root: Path, reference_python: Path,
              parallel: bool = True) -> Run:
    """Write every case's resolved config, then run all of them through the reference (one
    process) and through ours (one process), the two side by side."""
    workdir = Path(workdir)
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    run = Run(workdir, Path(family_root), {c.id: c for c in cases})
    jobs = {"reference": [], "ours": []}
    for c in cases:
        for tool in jobs:
            shutil.rmtree(run.out(tool, c.id), ignore_errors=True)
        cfg = workdir / "configs" / f"{c.id}.yml"
        cfg.write_text(c.resolve(family_root))
        for tool in jobs:
            jobs[tool].append({"id": c.id, "config": str(cfg), "out": str(run.out(tool, c.id)),
                               "seed": c.seed})
    procs = {}
    for tool, python in (("reference", reference_python), ("ours", sys.executable)):
        jf, rf = workdir / f"{tool}-jobs.json", workdir / f"{tool}-results.json"
        jf.write_text(json.dumps(jobs[tool]))
        log = open(workdir / f"{tool}.log", "w")
        start = time.perf_counter()
        p = subprocess.Popen([str(python), str(HERE / "batch.py"), tool, str(jf), str(rf)],
                             stdout=log, stderr=subprocess.STDOUT, env=_tool_env(tool),
                             cwd=str(workdir))
        procs[tool] = (p, start, rf, log)
        if not parallel:
            p.wait()
    pending = set(procs)
    while pending:  # note when each one finishes: the two run side by side
        for tool in sorted(pending):
            p, start, _, _ = procs[tool]
            if p.poll() is not None:
                run.seconds[tool] = time.perf_counter() - start
                pending.discard(tool)
        time.sleep(0.05)
    for tool, (p, start, rf, log) in procs.items():
        log.close()
        run.results[tool] = json.loads(rf.read_text()) if rf.exists() else {}
        if p.returncode:
            tail = (workdir / f"{tool}.log").read_text()[-1500:]
            for c in cases:  # the batch process itself died: every case left is a failure
                run.results[tool].setdefault(c.id, {"ok": False, "seconds": 0.0,
                                                    "error": f"batch process died: {tail}"})
    return run


# --- comparing -------------------------------------------------------------------------------
def load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    return state


@dataclass
class Comparison:
    tensors: int = 0
    problems: list[str] = field(default_factory=list)
    max_ulp: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self, limit: int = 40) -> str:
        lines = self.problems[:limit]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(lines + self.notes)


def _mantissa_bits(dtype) -> int:
    import torch

    return {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}[dtype]


def ulp_distance(ref, ours):
    """Per element |ours - ref| in units in the last place of ref's dtype, the ulp taken at
    max(|ref|, |ours|) floored at the RMS of the reference tensor: a value far smaller than the
    tensor's typical magnitude comes out of operands of that magnitude, and inherits their
    rounding error, so a vanishing ulp would misjudge it."""
    import torch

    a, b = ref.double(), ours.double()
    mag = torch.maximum(a.abs(), b.abs())
    floor = float(a.pow(2).mean().sqrt()) if a.numel() else 0.0
    mag = mag.clamp_min(max(floor, 1e-30))
    _, exp = torch.frexp(mag)
    ulp = torch.ldexp(torch.ones_like(mag), exp - 1 - _mantissa_bits(ref.dtype))
    return (a - b).abs() / ulp


def compare_tensors(ref: dict, ours: dict, parity: str = "exact", max_ulp: int = DEFAULT_MAX_ULP,
                    base: Optional[dict] = None, task_vectors: Optional[dict] = None,
                    into: Optional[Comparison] = None,
                    cutoff_ties: Optional[dict] = None) -> Comparison:
    """Compare two state dicts. `base` and `task_vectors` ({model: state}) are needed for stats;
    `cutoff_ties` ({tensor: bool mask}) for ties-cutoff: the entries where some model's |tau| equals
    its keep cut-off, the only places where a ties-cutoff output may exceed the ulp bound."""
    import torch

    cmp = into or Comparison()
    names = sorted(set(ref) | set(ours))
    cmp.tensors = len(names)
    worst_ulp = 0.0
    pooled = _Pool() if parity == "stats" else None
    for name in names:
        if name not in ours:
            cmp.problems.append(f"{name}: only in the reference's output {tuple(ref[name].shape)}")
            continue
        if name not in ref:
            cmp.problems.append(f"{name}: only in ours {tuple(ours[name].shape)}")
            continue
        r, o = ref[name], ours[name]
        if r.shape != o.shape or r.dtype != o.dtype:
            cmp.problems.append(f"{name}: reference {tuple(r.shape)} {r.dtype}, "
                                f"ours {tuple(o.shape)} {o.dtype}")
            continue
        if parity == "stats" and base is not None and name in base and base[name].shape == r.shape:
            _stats_one(name, r, o, base[name], task_vectors or {}, cmp, pooled)
            continue
        if parity in ("ulp", "ties-cutoff") or r.dtype in (torch.float16, torch.bfloat16):
            d = ulp_distance(r, o)
            if parity == "ties-cutoff":
                ties = (cutoff_ties or {}).get(name)
                beyond = d > max_ulp
                if ties is not None and beyond.any():
                    outside = beyond & ~ties
                    cmp.notes.append(f"{name}: {int(beyond.sum())} entries beyond {max_ulp} ulp, "
                                     f"{int(outside.sum())} of them off a cut-off tie or sign flip")
                    d = torch.where(ties, torch.zeros_like(d), d)
            m = float(d.max()) if d.numel() else 0.0
            worst_ulp = max(worst_ulp, m)
            allowed = max_ulp if parity in ("ulp", "ties-cutoff") else 1
            if m > allowed:
                cmp.problems.append(f"{name}: {m:.0f} ulp ({r.dtype}) > {allowed}; "
                                    f"{float((d > allowed).double().mean()):.2%} of elements; "
                                    f"max|d| {float((r.double() - o.double()).abs().max()):.3e}")
            continue
        x, y = r.double(), o.double()
        d = (x - y).abs()
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-6)
        if d.numel() and float(d.max()) > RTOL * scale:
            worst = float(d.max())
            cmp.problems.append(f"{name}: max|d| {worst:.3e} = {worst / scale:.2e}"
                                f" rel (max|ref| {scale:.3e}); "
                                f"{float((d > RTOL * scale).double().mean()):.2%} of elements")
    if parity in ("ulp", "ties-cutoff") or worst_ulp:
        cmp.max_ulp = worst_ulp
        cmp.notes.append(f"max ulp difference: {worst_ulp:.0f}")
    if pooled is not None:
        pooled.check(cmp)
    return cmp


class _Pool:
    """Whole-model statistics of the merged deltas (the strong test for DARE/DELLA).

    The two outputs are two draws of random masks, so their per-tensor statistics differ by noise;
    a systematic difference (a wrong density, rescale, weight or keep-probability) moves them the
    same way in every tensor. Each statistic is therefore tested on its per-tensor differences:
    flagged when their mean is both larger than a small floor and more than T_LIMIT standard errors
    from zero (a paired t-test over the tensors; the noise is measured, not assumed)."""

    T_LIMIT = 5.0
    MIN_NUMEL = 256  # smaller tensors (norms) carry too little signal; they still count in `kept`

    def __init__(self):
        self.n = 0
        self.kept = {"reference": 0, "ours": 0}
        self.sum = {"reference": 0.0, "ours": 0.0}
        self.sq = {"reference": 0.0, "ours": 0.0}
        self.log_rms: list[float] = []
        self.kept_diff: list[float] = []
        self.proj: dict[str, dict[str, list[float]]] = {}  # model -> tool -> per tensor <d, tau>
        self.tau_sq: dict[str, list[float]] = {}

    def add(self, dr, do, taus: dict):
        self.n += dr.numel()
        for tool, d in (("reference", dr), ("ours", do)):
            self.kept[tool] += int((d != 0).sum())
            self.sum[tool] += float(d.sum())
            self.sq[tool] += float((d * d).sum())
        if dr.numel() < self.MIN_NUMEL:
            return
        rr, ro = float(dr.pow(2).mean().sqrt()), float(do.pow(2).mean().sqrt())
        if rr > 0 and ro > 0:
            self.log_rms.append(math.log(ro / rr))
        self.kept_diff.append(float((do != 0).double().mean() - (dr != 0).double().mean()))
        for model, tau in taus.items():
            t2 = float((tau * tau).sum())
            if t2 == 0:
                continue
            proj = self.proj.setdefault(model, {"reference": [], "ours": []})
            proj["reference"].append(float((dr * tau).sum()))
            proj["ours"].append(float((do * tau).sum()))
            self.tau_sq.setdefault(model, []).append(t2)

    @classmethod
    def _systematic(cls, diffs: list[float], floor: float):
        """(mean, t) of per-tensor differences when they show a systematic shift, else None."""
        if not diffs:
            return None
        m = sum(diffs) / len(diffs)
        if abs(m) <= floor:
            return None
        if len(diffs) < 2:
            return m, math.inf
        sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / (len(diffs) - 1))
        t = math.inf if sd == 0 else m / (sd / math.sqrt(len(diffs)))
        return (m, t) if abs(t) > cls.T_LIMIT else None

    def check(self, cmp: Comparison):
        if not self.n:
            return
        kr, ko = self.kept["reference"] / self.n, self.kept["ours"] / self.n
        p = max((kr + ko) / 2, 1e-9)
        tol = 0.005 + 5 * math.sqrt(2 * p * (1 - p) / self.n)
        rr, ro = math.sqrt(self.sq["reference"] / self.n), math.sqrt(self.sq["ours"] / self.n)
        mr, mo = self.sum["reference"] / self.n, self.sum["ours"] / self.n
        cmp.notes.append(f"whole model: kept {kr:.4f} vs ours {ko:.4f}; delta rms {rr:.4e} vs "
                         f"{ro:.4e}; mean {mr:.2e} vs {mo:.2e}")
        if abs(kr - ko) > tol:
            cmp.problems.append(f"whole model: kept fraction of the merged delta {ko:.4f}, "
                                f"reference {kr:.4f} (tolerance {tol:.4f})")
        if abs(mo - mr) > 5 * math.sqrt(2) * max(rr, ro) / math.sqrt(self.n) + 1e-9:
            cmp.problems.append(f"whole model: merged delta mean {mo:.3e}, reference {mr:.3e}")
        if (hit := self._systematic(self.kept_diff, 0.005)):
            cmp.problems.append(f"kept fraction: ours is {hit[0]:+.4f} off the reference in the "
                                f"mean over {len(self.kept_diff)} tensors (t = {hit[1]:.1f})")
        if (hit := self._systematic(self.log_rms, 0.01)):
            cmp.problems.append(f"merged delta rms: ours is {math.exp(hit[0]):.4f} x the "
                                f"reference's in the mean over {len(self.log_rms)} tensors "
                                f"(t = {hit[1]:.1f}; whole model {ro:.4e} vs {rr:.4e})")
        for model, proj in self.proj.items():
            total = sum(self.tau_sq[model])
            er, eo = sum(proj["reference"]) / total, sum(proj["ours"]) / total
            cmp.notes.append(f"effective weight of {model}: {er:.4f} vs ours {eo:.4f}")
            scale = max(abs(er), 0.1)
            rel = [(o - r) / t2 / scale for r, o, t2 in
                   zip(proj["reference"], proj["ours"], self.tau_sq[model])]
            if (hit := self._systematic(rel, 0.01)):
                cmp.problems.append(f"effective weight <delta, tau>/<tau, tau> of {model}: ours "
                                    f"{eo:.4f}, reference {er:.4f} ({hit[0]:+.1%} in the mean "
                                    f"over {len(rel)} tensors, t = {hit[1]:.1f})")


def _stats_one(name, r, o, b, task_vectors, cmp: Comparison, pooled: _Pool):
    b64 = b.double()
    dr, do = r.double() - b64, o.double() - b64
    n = dr.numel()
    kr, ko = float((dr != 0).double().mean()), float((do != 0).double().mean())
    p = (kr + ko) / 2
    tol = 0.02 + 6 * math.sqrt(2 * p * (1 - p) / n) + 2 / n
    if abs(kr - ko) > tol:
        cmp.problems.append(f"{name}: kept fraction {ko:.3f}, reference {kr:.3f} "
                            f"(n={n}, tolerance {tol:.3f})")
    rr, ro = float(dr.pow(2).mean().sqrt()), float(do.pow(2).mean().sqrt())
    if n >= 256 and rr > 0:
        tol_r = 0.1 + 6 * math.sqrt(2 / max(n * p, 1))
        if abs(ro / rr - 1) > tol_r:
            cmp.problems.append(f"{name}: merged delta rms {ro:.3e}, reference {rr:.3e} "
                                f"(ratio {ro / rr:.3f}, tolerance {tol_r:.2f})")
    taus = {m: (sd[name].double() - b64) for m, sd in task_vectors.items()
            if name in sd and sd[name].shape == b.shape}
    pooled.add(dr, do, taus)


def compare_configs(ref_dir: Path, our_dir: Path) -> list[str]:
    """config.json: the keys that decide what the output model is."""
    def load(d):
        p = Path(d) / "config.json"
        return json.loads(p.read_text()) if p.exists() else None

    r, o = load(ref_dir), load(our_dir)
    if r is None or o is None:
        where = "ours" if r is None else "the reference"
        return [] if r is o else [f"config.json: only in {where}"]
    problems = []
    keys = ["architectures", "model_type", "num_hidden_layers", "n_layer", "num_layers",
            "vocab_size", "hidden_size", "n_embd", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings", "dtype"]
    for key in keys:
        rv, ov = r.get(key), o.get(key)
        if key == "dtype":
            rv, ov = r.get("dtype", r.get("torch_dtype")), o.get("dtype", o.get("torch_dtype"))
        if rv != ov:
            problems.append(f"config.json: {key} reference {rv!r}, ours {ov!r}")
    return problems


def _tokenizer_view(folder: Path):
    folder = Path(folder)
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tj.exists():
        return None
    data = json.loads(tj.read_text())
    vocab = dict(data.get("model", {}).get("vocab", {}))
    added = {a["content"]: (a["id"], bool(a.get("special"))) for a in data.get("added_tokens", [])}
    for content, (i, _) in added.items():
        vocab[content] = i
    cfg = json.loads(tc.read_text()) if tc.exists() else {}
    template = cfg.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in special.items()}
    return {"vocab": vocab, "added": added, "chat_template": (template or "").strip() or None,
            "special": special}


def compare_tokenizers(ref_dir: Path, our_dir: Path) -> tuple[list[str], Optional[dict]]:
    """Problems, and {reference id: our id} when the two vocabularies hold the same tokens under
    different ids. The reference's union vocabulary adds tokens in the iteration order of a set
    of model references (string hashes, randomised per process), so its ids for tokens the base
    lacks are not reproducible; a renumbering is therefore no difference in itself, provided the
    embedding rows follow their tokens (compare_case checks them by token)."""
    r, o = _tokenizer_view(ref_dir), _tokenizer_view(our_dir)
    if r is None or o is None:
        return ([] if r is o else [f"tokenizer: tokenizer.json only in "
                                   f"{'ours' if r is None else 'the reference'}"]), None
    problems = []
    only_r = sorted(set(r["vocab"]) - set(o["vocab"]), key=r["vocab"].get)
    only_o = sorted(set(o["vocab"]) - set(r["vocab"]), key=o["vocab"].get)
    moved = sorted(t for t in set(r["vocab"]) & set(o["vocab"]) if r["vocab"][t] != o["vocab"][t])
    permutation = None
    if only_r or only_o:
        problems.append(f"tokenizer: vocabulary {len(o['vocab'])} tokens vs reference "
                        f"{len(r['vocab'])}; only in reference {only_r[:5]}, only in ours "
                        f"{only_o[:5]}, {len(moved)} with another id {moved[:5]}")
    elif moved:
        permutation = {r["vocab"][t]: o["vocab"][t] for t in r["vocab"]}
    def without_ids(added):
        return {content: special for content, (_, special) in added.items()}
    if without_ids(r["added"]) != without_ids(o["added"]) or \
            (permutation is None and r["added"] != o["added"]):
        problems.append(f"tokenizer: added tokens differ: reference "
                        f"{sorted(r['added'].items())[:8]}, ours {sorted(o['added'].items())[:8]}")
    if r["special"] != o["special"]:
        problems.append(f"tokenizer: special tokens reference {r['special']}, ours {o['special']}")
    if r["chat_template"] != o["chat_template"] and \
            render_chat(r["chat_template"]) != render_chat(o["chat_template"]):
        def short(t):
            return None if t is None else (t[:60] + "...")
        problems.append(f"tokenizer: chat template reference {short(r['chat_template'])!r}, "
                        f"ours {short(o['chat_template'])!r}")
    return problems, permutation


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def render_chat(template: Optional[str]):
    """What a chat template renders for a few conversations, with and without the generation
    prompt: two templates that differ only in Jinja whitespace control render the same text."""
    if template is None:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(template)
    return [tpl.render(messages=m, add_generation_prompt=g, bos_token="<s>", eos_token="</s>")
            for m in CONVERSATIONS for g in (False, True)]


def follow_tokens(ours: dict, ref: dict, permutation: dict) -> list[str]:
    """Reorder the rows of our vocabulary-sized tensors into the reference's token ids."""
    import torch

    moved = []
    for name, t in ours.items():
        rows = t.shape[0] if t.dim() else 0
        if name in ref and ref[name].shape == t.shape and rows > max(permutation):
            index = torch.arange(rows)
            for ref_id, our_id in permutation.items():
                index[ref_id] = our_id
            ours[name] = t[index]
            moved.append(name)
    return moved


def compare_case(run: Run, case_id: str) -> Comparison:
    """Everything about one case: refusals, tensors, config.json, tokenizer."""
    import yaml

    case = run.cases[case_id]
    cmp = Comparison()
    ref_res, our_res = run.results["reference"].get(case_id), run.results["ours"].get(case_id)
    if not ref_res or not ref_res["ok"]:
        cmp.problems.append(f"the reference refused or failed (the corpus should not hold this "
                            f"case): {ref_res and ref_res['error']}")
        return cmp
    if not our_res or not our_res["ok"]:
        cmp.problems.append(f"ours refused or failed: {our_res and our_res['error']}")
        return cmp
    ref_dir, our_dir = run.out("reference", case_id), run.out("ours", case_id)
    base = tvs = None
    if case.parity == "stats":
        cfg = yaml.safe_load(case.resolve(run.family_root))
        if cfg.get("base_model"):
            base = load_tensors(cfg["base_model"])
            models = [m["model"] for m in cfg.get("models") or []] + \
                     [s["model"] for sl in cfg.get("slices") or [] for s in sl.get("sources", [])]
            tvs = {Path(m).parent.name + "/" + Path(m).name: load_tensors(m)
                   for m in dict.fromkeys(models) if m != cfg["base_model"]}
    ties = cutoff_ties(case.resolve(run.family_root)) if case.parity == "ties-cutoff" else None
    tokenizer_problems, permutation = compare_tokenizers(ref_dir, our_dir)
    ref, ours = load_tensors(ref_dir), load_tensors(our_dir)
    if permutation:
        moved = follow_tokens(ours, ref, permutation)
        n = sum(1 for a, b in permutation.items() if a != b)
        cmp.notes.append(f"tokenizer: same tokens, {n} under other ids; rows of {moved} "
                         f"compared by token")
    compare_tensors(ref, ours, case.parity, case.max_ulp, base=base, task_vectors=tvs, into=cmp,
                    cutoff_ties=ties)
    cmp.problems += compare_configs(ref_dir, our_dir)
    cmp.problems += tokenizer_problems
    return cmp


def cutoff_ties(config_text: str) -> dict:
    """For a half-precision TIES config: per output tensor, the entries where the two documented
    deviations of docs/compatibility.md may show, the only places a ties-cutoff output may exceed
    the ulp bound:
    - cut-off ties: some model's |tau| equals the magnitude at its keep cut-off (k = int(density
      * n) kept). Among equal magnitudes the reference keeps whichever its unstable argsort puts
      first (it varies with the CPU's SIMD level); we keep the lowest positions.
    - sign flips by precision: the elected sign of the weighted kept deltas differs between the
      reference's half-precision arithmetic and our float32 arithmetic (a sum that rounds to 0
      in half precision elects +, the exact sum may be negative).
    The per-tensor densities and weights come from our planner (gradients and filters resolved);
    the planner's parameter resolution is itself checked exactly by the float32 TIES configs."""
    import torch
    import yaml

    from merge.config import MergeConfig
    from merge.engine import validate

    plan = validate(MergeConfig.from_dict(yaml.safe_load(config_text)))
    states: dict = {}

    def tensor(ref: str, name: str):
        if ref not in states:
            states[ref] = load_tensors(Path(ref))
        return states[ref][name]

    out = {}
    for tp in plan.tensors:
        if tp.base is None or tp.copy_only:
            continue
        base = tensor(tp.base.model, tp.base.tensor)
        mask = torch.zeros(base.shape, dtype=torch.bool)
        half_sum = torch.zeros(base.shape, dtype=base.dtype)
        exact_sum = torch.zeros(base.shape, dtype=torch.float32)
        for inp, params in zip(tp.inputs, tp.model_params):
            x = tensor(inp.model, inp.tensor)
            density, weight = float(params.get("density", 1.0)), float(params.get("weight", 1.0))
            tau_half, tau = x - base, x.float() - base.float()
            kept = torch.ones(base.shape, dtype=torch.bool)
            k = int(density * tau.numel())
            if density < 1.0 and k > 0:
                mag = tau_half.abs().float()
                cut = torch.topk(mag.flatten(), k).values[-1]
                mask |= mag == cut
                kept = mag >= cut
            w_half = torch.tensor(weight, dtype=base.dtype)     # the reference's weight tensor
            half_sum += torch.where(kept, tau_half * w_half, torch.zeros_like(tau_half))
            exact_sum += torch.where(kept, tau * weight, torch.zeros_like(tau))
        mask |= (half_sum >= 0) != (exact_sum >= 0)
        out[tp.name] = mask
    return out
