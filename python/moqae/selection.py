"""The split hash of the store format: a SplitMix64 finaliser of (id, seed) mapped to [0, 1)."""
_MASK = (1 << 64) - 1
_PHI = 0x9E3779B97F4A7C15


def mix(seq_id, seed):
    z = ((seq_id ^ ((seed * _PHI) & _MASK)) + _PHI) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def unit_value(seq_id, seed):
    """u(id, seed) = z / 2^64."""
    return mix(seq_id, seed) / 2.0**64


def selected(seq_id, seed, fraction):
    """A dumper asked for `fraction` writes the sequences with u < fraction."""
    return unit_value(seq_id, seed) < fraction
