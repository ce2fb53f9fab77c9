"""Switch one quantization site to float and back (shared by accuracy fallback and StableQuant).

"In float" means the site's input quantizer and its own weight quantizer are
off; an attention site's weight quantizer belongs to its projections' sites
and stays as it is.
"""


def quantizers_of(point):
    """The quantizers that :func:`to_float` switches for one site."""
    quantizers = [point.input_quantizer]
    wq = getattr(point.module, "weight_quantizer", None)
    if wq is not None and point.op != "attention":
        quantizers.append(wq)
    return quantizers


def to_float(point, on):
    """Switch one site's quantizers off (``on=True``) or back on."""
    for q in quantizers_of(point):
        q.disable() if on else q.enable()
