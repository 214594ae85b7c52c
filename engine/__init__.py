"""msdda: compose K aligned diffusion experts at denoising time, exactly (MSDDA, arXiv 2604.14379).

    >>> eng = msdda.Engine.from_pretrained(base, experts={"a": path_a, "b": path_b})
    >>> out = eng.generate(class_labels=3, weights={"a": 0.6, "b": 0.4}, num_images=4)

The per-step rule: P = sum_k c_k / var_k ; mu = (sum_k c_k mu_k / var_k) / P ; x_prev = mu + z / sqrt(P).
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import msdda.kernels` must not pull in diffusers
    if name in ("Engine", "GenerateOutput", "Request", "MicroConditioning"):
        from msdda import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'msdda' has no attribute {name!r}")


__all__ = ["Engine", "GenerateOutput", "MicroConditioning", "Request", "__version__"]
