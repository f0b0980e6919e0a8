"""README.md model card for a merged model: front matter that the hub reads, then what was done."""
from __future__ import annotations

from pathlib import Path

import yaml


def _is_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).exists()


def write_model_card(folder: Path, plan, title: str) -> None:
    refs = list(plan.sources)
    # "org/model@rev+adapter": the hub id is the part before the revision and the adapter
    ids = [r.split("+")[0].split("@")[0] for r in refs]
    hub = list(dict.fromkeys(i for i in ids if _is_hub_id(i)))
    front = {"base_model": hub or None, "library_name": "transformers", "tags": ["merge", "evomerge"]}
    front = {k: v for k, v in front.items() if v}
    method = plan.method
    paper = f" ([paper]({method.paper}))" if method.paper else ""
    models = "\n".join(f"- {r}" + (" (base)" if r == plan.config.base_model else "") for r in refs)
    body = (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {title}\n\n"
        f"This model was merged with evomerge using the "
        f"**{method.name}** method{paper}: {method.summary}.\n\n"
        f"## Models\n\n{models}\n\n"
        f"## Configuration\n\n```yaml\n{yaml.safe_dump(plan.config.to_dict(), sort_keys=False)}```\n"
    )
    (folder / "README.md").write_text(body)
