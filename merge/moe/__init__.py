"""Mixture-of-experts assembly (`mergekit-moe`): dense experts' MLPs behind a prompt-built router.

    config.py   the YAML format (base_model, gate_mode, experts, shared_experts, ...)
    layouts.py  output architectures: Mixtral, Qwen2-MoE, PhiMoE tensor names and configs
    gates.py    router rows from hidden states, embeddings or random vectors
    build.py    validate from headers, then stream the output folder
    cli.py      the command line
"""
