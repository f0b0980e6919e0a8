"""Write the output tokenizer and chat template.

The tokenizer files of the vocabulary's source model are copied; tokens the merge added are
appended to `tokenizer.json`'s added tokens (and `tokenizer_config.json`'s decoder map) with the ids
the embedding rows were built for, so ids and rows agree by construction. Editing the JSON keeps the
user's tokenizer class and settings exactly as they were.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

from merge.errors import ConfigError, EvomergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.txt")

# The built-in templates render exactly what the reference toolkit's templates of the same names
# render (checked on conversations with and without system messages), whitespace included.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
        "message['content'] | trim + '<|eot_id|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}{{ '\n\n' }}"
        "{% set headers = {'user': '### Instruction:\n', 'assistant': '### Response:\n', "
        "'user_context': '### Input:\n'} %}"
        "{% for message in messages %}{% if message['role'] in headers %}"
        "{{ headers[message['role']] + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '### Response:\n' }}{% endif %}"),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ ' [INST] ' }}"
        "{% if loop.first and system is defined %}{{ system + '\n\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, besides an "
        "optional first system message') }}{% endif %}{% endfor %}"),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '        [|system|][|endofturn|]\n\n' }}{% endif %}"
        "{{ '    [|' + message['role'] + '|]' + message['content'] + '\n' }}"
        "{% if message['role'] == 'user' %}{{ '        \n\n' }}"
        "{% else %}{{ '        [|endofturn|]\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '    [|assistant|]\n' }}{% endif %}"),
}


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


def write_tokenizer(plan, out: Path) -> None:
    vp = plan.vocab
    folder = (vp.tokenizer_folder if vp is not None and vp.tokenizer_folder
              else plan.sources[plan.reference].folder)
    copy_tokenizer_files(folder, out)
    if vp is not None and vp.added:
        _append_tokens(out, vp)
    template = chat_template(plan)
    if template is not None:
        _write_chat_template(out, template)


def _append_tokens(out: Path, vp) -> None:
    tj = out / "tokenizer.json"
    if not tj.is_file():
        raise EvomergeError("tokenizer: the source tokenizer has no tokenizer.json to extend; "
                            "choose a source with a fast tokenizer")
    data = json.loads(tj.read_text())
    start = len(vp.tokens) - len(vp.added)
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    decoder = tok_cfg.get("added_tokens_decoder")   # older tokenizer configs repeat the list
    for k, entry in enumerate(vp.added):
        data.setdefault("added_tokens", []).append({"id": start + k, **entry})
        if decoder is not None:
            decoder[str(start + k)] = dict(entry)
    tj.write_text(json.dumps(data, ensure_ascii=False, indent=2))
    if decoder is not None:
        cfg_path.write_text(json.dumps(tok_cfg, ensure_ascii=False, indent=2))
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
    for k, entry in enumerate(vp.added):
        token = entry["content"]
        if vocab.get(token) != start + k:
            raise EvomergeError(f"tokenizer: could not give token {token!r} id {start + k} (the "
                                f"source tokenizer's ids have gaps); choose another source")


def _template_of(folder: Path) -> Optional[str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(t, str):
            return t
    return None


def chat_template(plan) -> Optional[str]:
    choice = plan.config.chat_template
    if choice is None:
        return None
    if choice == "auto":
        found = [t.strip() for t in (_template_of(s.folder) for s in plan.sources.values())
                 if t and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if "{%" in choice or "{{" in choice:
        return choice
    raise ConfigError("chat_template", f"'{choice}' is neither auto, a known name "
                                       f"({', '.join(TEMPLATES)}) nor a Jinja template")


def _write_chat_template(out: Path, template: str) -> None:
    (out / "chat_template.jinja").write_text(template)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "chat_template" in cfg:
            cfg["chat_template"] = template  # keep one template, not two that disagree
            cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
