"""What a router may read for each token (docs/FORMATS.md, Calibration store: `router_input`), and how wide
it is; no torch, so that reading a store's manifest or the command line loads none."""

ROUTER_INPUTS = ("key", "key-prerope", "key+value", "key+chunk")    # by their code in bits 1–2 of an export's flags
CHUNK_FEATURES = ("key error int4", "key error int2", "value error int4", "value error int2",
                  "log key norm", "log value norm", "key range ratio")   # the statistics of `key+chunk` (features.py)


def router_input_width(kind, head_dim):
    """Dimensions of a router input vector of `kind` for heads of `head_dim`."""
    return {"key+value": 2 * head_dim, "key+chunk": head_dim + len(CHUNK_FEATURES)}.get(kind, head_dim)
