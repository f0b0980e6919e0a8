#!/usr/bin/env python
"""Run one merge config through the reference toolkit (mergekit 0.1.5) and through our
`mergekit-yaml`, and print what differs: tensors (with the size of the difference), config.json and
the tokenizer.

    .venv/bin/python scripts/reference_diff.py CONFIG.yml [--seed N] [--keep DIR]
                                               [--parity exact|ulp|stats] [--max-ulp N]

CONFIG is either a config of your own, whose local model paths are taken relative to the current
directory (as `mergekit-yaml` does; they are made absolute here, since the reference would take a
relative `a/b` for a hub id), or a corpus config from tests/reference/configs/, whose tiny-family
models (`llama/c0` ...) are built on the fly. The reference comes from scripts/setup_reference.sh
(EVOMERGE_REFERENCE_VENV overrides where it lives). The comparison criteria are the differential
suite's (docs/compatibility.md). Exit status: 0 same model, 1 different, 3 a tool refused or
failed, 2 bad usage or no reference.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reference"))
import harness  # noqa: E402


def absolute_models(config: dict) -> dict:
    """Every model reference that names an existing local folder, made absolute."""
    def fix(ref):
        if not isinstance(ref, str):
            return ref
        path, plus, lora = ref.partition("+")
        p = Path(path)
        if not p.is_absolute() and p.exists():
            path = str(p.resolve())
        if plus and not Path(lora).is_absolute() and Path(lora).exists():
            lora = str(Path(lora).resolve())
        return path + plus + lora

    if "base_model" in config:
        config["base_model"] = fix(config["base_model"])
    for m in config.get("models") or []:
        m["model"] = fix(m.get("model"))
    for s in config.get("slices") or []:
        for src in s.get("sources") or []:
            src["model"] = fix(src.get("model"))
    if config.get("tokenizer_source") not in (None, "base", "union"):
        config["tokenizer_source"] = fix(config["tokenizer_source"])
    tok = config.get("tokenizer")
    if isinstance(tok, dict):
        if tok.get("source") not in (None, "base", "union"):
            tok["source"] = fix(tok["source"])
        for spec in (tok.get("tokens") or {}).values():
            if isinstance(spec, dict):
                if isinstance(spec.get("source"), dict) and "model" in spec["source"]:
                    spec["source"]["model"] = fix(spec["source"]["model"])
                else:
                    spec["source"] = fix(spec.get("source"))
    return config


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--seed", type=int, default=None, help="--random-seed for both tools")
    ap.add_argument("--keep", default=None, help="folder for the configs and both outputs")
    ap.add_argument("--parity", choices=["exact", "ulp", "stats"], default=None,
                    help="how to compare (default: the config's '# parity:' line, else exact)")
    ap.add_argument("--max-ulp", type=int, default=None)
    args = ap.parse_args(argv)

    path = Path(args.config)
    if not path.is_file():
        print(f"error: CONFIG: no such file {path}", file=sys.stderr)
        return 2
    case = harness.read_case(path)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="reference-diff-"))
    work.mkdir(parents=True, exist_ok=True)
    family_root = work / "families"
    local = any(Path(m.group(0)).exists() for m in harness.FAMILY_REF.finditer(case.text))
    if case.families and not local:  # a corpus config: build the tiny families it names
        harness.build_families(family_root, case.families)
    else:
        data = yaml.safe_load(case.text)
        if not isinstance(data, dict):
            print(f"error: CONFIG: {path} is not a merge config (a YAML mapping)", file=sys.stderr)
            return 2
        case.text = yaml.safe_dump(absolute_models(data), sort_keys=False)
    case.parity = args.parity or case.parity
    case.max_ulp = args.max_ulp if args.max_ulp is not None else case.max_ulp
    case.seed = args.seed if args.seed is not None else case.seed
    try:
        reference_python = harness.ensure_reference()
    except harness.ReferenceUnavailable as e:
        print(f"error: reference: {e}", file=sys.stderr)
        return 2
    run = harness.run_cases([case], work, family_root, reference_python)
    for tool in ("reference", "ours"):
        r = run.results[tool][case.id]
        print(f"{tool}: {'ok' if r['ok'] else 'FAILED: ' + r['error']} ({r['seconds']:.1f} s)")
    if not all(run.results[t][case.id]["ok"] for t in run.results):
        return 3
    cmp = harness.compare_case(run, case.id)
    print(cmp.report(limit=10**6))
    print(f"{cmp.tensors} tensors compared [{case.parity}], {len(cmp.problems)} differences "
          f"(outputs in {work})")
    return 0 if cmp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
