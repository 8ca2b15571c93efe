"""edgert: run distilled reasoning and Mixture-of-Experts LLMs on edge CPUs.

    import edgert
    llm = edgert.load("qwen-int4/")
    for tok in llm.generate("Why is the sky blue?", max_tokens=200):
        print(tok.text, end="", flush=True)

The runtime needs only onnxruntime, numpy and jinja2 (`tokenizers` when present); the exporter
(`edgert export`, package edgert_export) needs only numpy and is never imported by the runtime
(except by `edgert bench --synthetic`, which builds a model).
"""
__all__ = ["load", "LLM", "Token"]


def __getattr__(name):   # import lazily: `import edgert` stays cheap, submodules stay independent
    if name in __all__:
        from . import llm
        return getattr(llm, name)
    raise AttributeError(name)
