"""Differential parity with the reference toolkit (mergekit 0.1.5): every config of the corpus in
tests/reference/configs/ goes through the reference's `mergekit-yaml` and through ours, and the
outputs must agree (tensors, config.json, tokenizer). The criteria are in tests/reference/harness.py
and docs/compatibility.md ("The differential suite").

The reference runs from its own virtual environment (scripts/setup_reference.sh; override with
EVOMERGE_REFERENCE_VENV). The only reason these tests skip is that the package registry could not be
reached to install it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "reference"))
import harness  # noqa: E402

CASES = harness.load_corpus()


@pytest.fixture(scope="module")
def parity_run(request, tmp_path_factory):
    """Both tools over the selected cases (all of them, unless -k picked some), once."""
    selected = {item.callspec.params["case_id"] for item in request.session.items
                if getattr(item, "callspec", None) and "case_id" in item.callspec.params}
    cases = [c for c in CASES if c.id in selected] or CASES
    try:
        reference_python = harness.ensure_reference()
    except harness.ReferenceUnavailable as e:
        if e.registry_unreachable:
            pytest.skip(f"reference toolkit not installed, registry unreachable: {e}")
        raise
    families = harness.build_families(tmp_path_factory.mktemp("ref-families"),
                                      set().union(*(c.families for c in cases)))
    run = harness.run_cases(cases, tmp_path_factory.mktemp("ref-parity"), families,
                            reference_python)
    run.comparisons = {}
    yield run
    _summary(request.config, run)


def _summary(config, run):
    """One block in the terminal: the corpus size, what failed, the half-precision ulp."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not run.comparisons:
        return
    done = run.comparisons
    failing = sorted(k for k, c in done.items() if not c.ok)
    ulps = ", ".join(f"{k} {c.max_ulp:.0f}" for k, c in sorted(done.items())
                     if c.max_ulp is not None)
    lines = [f"reference parity (mergekit 0.1.5): {len(done)} configs, "
             f"{sum(c.tensors for c in done.values())} tensors compared, {len(failing)} differing;"
             f" reference {run.seconds['reference']:.0f} s, ours {run.seconds['ours']:.0f} s "
             f"(side by side)"]
    if ulps:
        lines.append(f"  max ulp, half precision: {ulps}")
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_reference_parity(parity_run, case_id):
    cmp = harness.compare_case(parity_run, case_id)
    case = parity_run.cases[case_id]
    parity_run.comparisons[case_id] = cmp
    if not cmp.ok:
        pytest.fail(f"{case_id} ({case.description}) differs from the reference [{case.parity}]: "
                    f"{len(cmp.problems)} problems, {cmp.tensors} tensors compared\n"
                    + cmp.report(), pytrace=False)


def test_corpus_is_wide():
    """Every method the reference registers appears in the corpus, and every comparison mode."""
    import yaml

    methods = {yaml.safe_load(c.text)["merge_method"] for c in CASES}
    assert methods >= {"linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic",
                       "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                       "della", "della_linear", "sce", "model_stock", "nearswap", "arcee_fusion",
                       "passthrough", "ram", "ramplus_tl"}
    assert {c.parity for c in CASES} == {"exact", "stats", "ulp", "ties-cutoff"}
    assert all(c.families for c in CASES), "a corpus config names no tiny-family model"


# --- the comparator itself must be able to fail ------------------------------------------------
def _state(seed, n=4096, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"w": (torch.randn(n, generator=g) * 0.02).to(dtype),
            "norm": (1 + torch.randn(32, generator=g) * 0.02).to(dtype)}


def test_exact_criterion_is_1e5_relative():
    ref = _state(0)
    ours = {k: v.clone() for k, v in ref.items()}
    ours["w"][7] += 0.5e-5 * ref["w"].abs().max()
    assert harness.compare_tensors(ref, ours).ok
    ours["w"][7] += 1e-5 * ref["w"].abs().max()
    cmp = harness.compare_tensors(ref, ours)
    assert not cmp.ok and cmp.problems[0].startswith("w: max|d|")
    del ours["norm"]
    assert any("only in the reference" in p for p in harness.compare_tensors(ref, ours).problems)


def test_ulp_criterion_counts_units_in_the_last_place():
    ref = _state(1, dtype=torch.bfloat16)
    ours = {k: v.clone() for k, v in ref.items()}
    bits = ours["w"].view(torch.int16)
    bits[:10] += 3                         # three bf16 steps on the first ten elements
    cmp = harness.compare_tensors(ref, ours, "ulp", max_ulp=4)
    assert cmp.ok and cmp.max_ulp is not None and 0 < cmp.max_ulp <= 3
    bits[:10] += 3
    assert not harness.compare_tensors(ref, ours, "ulp", max_ulp=4).ok


def test_ties_cutoff_criterion_excuses_only_the_marked_entries():
    ref = _state(1, dtype=torch.bfloat16)
    ours = {k: v.clone() for k, v in ref.items()}
    ours["w"].view(-1)[:3] = -ours["w"].view(-1)[:3] - 1     # far beyond any ulp bound
    ties = torch.zeros(ref["w"].shape, dtype=torch.bool)
    ties.view(-1)[:3] = True
    assert harness.compare_tensors(ref, ours, "ties-cutoff", cutoff_ties={"w": ties}).ok
    ties.view(-1)[2] = False                                  # one difference off the ties
    assert not harness.compare_tensors(ref, ours, "ties-cutoff", cutoff_ties={"w": ties}).ok


def test_stats_criterion_catches_a_missing_rescale_and_a_wrong_density():
    base = _state(2, n=20000)
    tau = {k: v - base[k] for k, v in _state(3, n=20000).items()}
    child = {k: base[k] + tau[k] for k in base}

    def dare(seed, density, rescale=True):
        g = torch.Generator().manual_seed(seed)
        return {k: base[k] + tau[k] * (torch.rand(tau[k].shape, generator=g) < density)
                / (density if rescale else 1.0) for k in base}

    def check(a, b):
        return harness.compare_tensors(a, b, "stats", base=base, task_vectors={"c": child})

    assert check(dare(10, 0.5), dare(11, 0.5)).ok
    assert not check(dare(10, 0.5), dare(11, 0.5, rescale=False)).ok
    assert not check(dare(10, 0.5), dare(11, 0.6)).ok


def test_chat_templates_are_compared_by_what_they_render():
    a = "{% for m in messages %}{{'<|' + m['role'] + '|>' + m['content']}}{% endfor %}"
    b = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    c = "{% for m in messages %}{{ '[' + m['role'] + ']' + m['content'] }}{% endfor %}"
    assert harness.render_chat(a) == harness.render_chat(b)
    assert harness.render_chat(a) != harness.render_chat(c)
